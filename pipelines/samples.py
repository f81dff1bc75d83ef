"""Real photos that ship inside scikit-image's wheel, so demos and tests need no download."""

from __future__ import annotations

from PIL import Image

# Names of ``skimage.data`` loaders: colour photos of different sizes and aspect ratios.
BUNDLED_PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry")


def bundled_photos(names: tuple[str, ...] = BUNDLED_PHOTOS) -> list[tuple[str, Image.Image]]:
    """(name, RGB PIL image) for each bundled photo."""
    from skimage import data

    out = []
    for name in names:
        loader = getattr(data, name, None)
        if loader is None:
            raise KeyError(f"skimage.data has no image {name!r}")
        out.append((name, Image.fromarray(loader()).convert("RGB")))
    return out
