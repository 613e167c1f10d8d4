"""Moved to :mod:`lightning_stability.reference.data` (0.2.0, reference material, not the plugin); the DataModules
keep this import path too. Names are imported lazily on first use."""

from typing import TYPE_CHECKING

from lightning_stability._lazy import lazy_getattr

_NAMES = {
    "AudioFolderDataModule": "lightning_stability.reference.data.audio_folder",
    "SpeechCorpusDataModule": "lightning_stability.reference.data.speech_corpus",
    "LatentPairDataModule": "lightning_stability.reference.data.latents",
    "AudioFileError": "lightning_stability.reference.data._audio",
    "ResumableDataLoader": "lightning_stability.reference.data._audio",
}
__all__ = list(_NAMES)
__getattr__ = lazy_getattr(__name__, _NAMES)

if TYPE_CHECKING:  # the static view of the lazy names (type checkers)
    from lightning_stability.reference.data._audio import AudioFileError as AudioFileError
    from lightning_stability.reference.data._audio import ResumableDataLoader as ResumableDataLoader
    from lightning_stability.reference.data.audio_folder import AudioFolderDataModule as AudioFolderDataModule
    from lightning_stability.reference.data.latents import LatentPairDataModule as LatentPairDataModule
    from lightning_stability.reference.data.speech_corpus import SpeechCorpusDataModule as SpeechCorpusDataModule
