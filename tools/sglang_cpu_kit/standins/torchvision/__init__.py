"""Import-only stand-in for torchvision in the sglang CPU kit (text models only).

Why: PyPI's torchvision wheels are linked against the CUDA torch and fail to load beside the CPU torch
("operator torchvision::nms does not exist"), yet sglang 0.5.23 imports torchvision.transforms at import time
(via its multimodal config modules). No dist-info is installed, so transformers still reports torchvision as
unavailable. Any real use raises RuntimeError naming the function.
"""

__version__ = "0.0.0+sglang-cpu-kit"


def _unavailable(qualname: str):
    def missing(*args, **kwargs):
        raise RuntimeError(
            f"torchvision stand-in (sglang CPU kit): {qualname} is unavailable; vision models "
            "are not supported by the CPU kit"
        )

    return missing


def __getattr__(name):
    return _unavailable(f"torchvision.{name}")


from torchvision import io, transforms  # noqa: E402,F401
