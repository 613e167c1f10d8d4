"""Lightning DataModules: audio folders, the eSpeak NG speech corpus, latent pairs. Imported lazily."""

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
