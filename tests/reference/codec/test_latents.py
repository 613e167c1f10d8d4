import pytest
from torch import nn

from lightning_stability.reference.codec.latents import CodecLatentEncoder, load_codec_encoder


def test_a_module_without_an_encoder_is_a_type_error_naming_codec():
    with pytest.raises(TypeError, match=r"`codec` must be a CodecModule .*got Linear"):
        CodecLatentEncoder(nn.Linear(2, 2))


def test_load_codec_encoder_checks_its_arguments_before_loading(tmp_path):
    with pytest.raises(TypeError, match="`path` must be a path"):
        load_codec_encoder(3)
    with pytest.raises(ValueError, match="`sample_rate` must be >= 1, got 0"):
        load_codec_encoder(tmp_path / "missing.ckpt", sample_rate=0)
    with pytest.raises(TypeError, match="`sample_rate` must be an int or None, got 16000.0"):
        load_codec_encoder(tmp_path / "missing.ckpt", sample_rate=16000.0)
