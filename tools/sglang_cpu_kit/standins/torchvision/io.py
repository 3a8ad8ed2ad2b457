import enum

from torchvision import _unavailable


class ImageReadMode(enum.Enum):
    UNCHANGED = 0
    GRAY = 1
    GRAY_ALPHA = 2
    RGB = 3
    RGB_ALPHA = 4
    RGBA = 4


def __getattr__(name):
    return _unavailable(f"torchvision.io.{name}")
