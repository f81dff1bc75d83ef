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


def write_sample_webdataset(out: str, per_shard: int = 3, names: tuple[str, ...] = BUNDLED_PHOTOS) -> list[str]:
    """Write the bundled photos as WebDataset tar shards (PNG + ``cls`` = photo index); returns paths."""
    import io
    import tarfile
    from pathlib import Path

    root = Path(out)
    root.mkdir(parents=True, exist_ok=True)
    photos = bundled_photos(names)
    paths = []
    for s in range(0, len(photos), per_shard):
        path = root / f"photos-{s // per_shard:04d}.tar"
        with tarfile.open(path, "w") as tar:
            for i, (name, img) in enumerate(photos[s : s + per_shard], start=s):
                png = io.BytesIO()
                img.save(png, format="PNG")
                for ext, data in (("png", png.getvalue()), ("cls", str(i).encode())):
                    info = tarfile.TarInfo(f"{name}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        paths.append(str(path))
    return paths


if __name__ == "__main__":
    import sys

    for path in write_sample_webdataset(sys.argv[1] if len(sys.argv) > 1 else "out/photos"):
        print(path)
