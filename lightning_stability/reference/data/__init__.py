"""Reference data: Lightning DataModules for audio folders, the eSpeak NG speech corpus and latent pairs (what the
reference codec and cascade train on). Imported lazily; also importable from ``lightning_stability.data``."""

from typing import TYPE_CHECKING

from lightning_stability._lazy import lazy_getattr

_NAMES = {
    "AudioFolderDataModule": ".audio_folder",
    "SpeechCorpusDataModule": ".speech_corpus",
    "LatentPairDataModule": ".latents",
    "AudioFileError": "._audio",
    "ResumableDataLoader": "._audio",
}
__all__ = list(_NAMES)
__getattr__ = lazy_getattr(__name__, _NAMES)

if TYPE_CHECKING:  # the static view of the lazy names (type checkers, the API reference)
    from lightning_stability.reference.data._audio import AudioFileError as AudioFileError
    from lightning_stability.reference.data._audio import ResumableDataLoader as ResumableDataLoader
    from lightning_stability.reference.data.audio_folder import AudioFolderDataModule as AudioFolderDataModule
    from lightning_stability.reference.data.latents import LatentPairDataModule as LatentPairDataModule
    from lightning_stability.reference.data.speech_corpus import SpeechCorpusDataModule as SpeechCorpusDataModule
