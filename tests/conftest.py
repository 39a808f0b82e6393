from pathlib import Path

import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def _no_default_engine_cache():
    """Tests convert `--engine openvino` passes themselves: the default user cache folder stays untouched."""
    import os

    before = os.environ.get("FDSL_ENGINE_CACHE")
    os.environ["FDSL_ENGINE_CACHE"] = "off"
    yield
    if before is None:
        os.environ.pop("FDSL_ENGINE_CACHE", None)
    else:
        os.environ["FDSL_ENGINE_CACHE"] = before


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    """Tiny models run faster on one thread than with thread start-up on a busy 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny_weights(request, tmp_path_factory) -> Path:
    """A full open_clip state dict of the random-weight FDSL-Tiny-ViT, saved to a file (one per test module).

    The module may set ``TINY_WEIGHTS_SEED`` (default 0) and ``TINY_WEIGHTS_IMAGE_SIZE`` (the size the
    model is built at, so the stored positional grid differs from the run's; default the config's 112).
    """
    import open_clip

    from fdsl.core.backbone import register_model_configs

    seed = getattr(request.module, "TINY_WEIGHTS_SEED", 0)
    size = getattr(request.module, "TINY_WEIGHTS_IMAGE_SIZE", None)
    register_model_configs()
    torch.manual_seed(seed)
    path = tmp_path_factory.mktemp("tiny_weights") / f"tiny_{seed}_{size or 'default'}.pt"
    kw = {"force_image_size": size} if size else {}
    torch.save(open_clip.create_model("FDSL-Tiny-ViT", pretrained=None, **kw).state_dict(), path)
    return path
