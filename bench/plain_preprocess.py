"""The script a user writes instead of ``imgflow preprocess``: resize every image into TFRecords.

    python bench/plain_preprocess.py DATA_DIR OUT_DIR [--image-size 128]

Walks ``DATA_DIR/<class>/**`` (sorted class folders = labels), decodes and resizes each
file with Pillow, JPEG-encodes it and writes one ``tf.train.Example`` per image into one
``train.tfrecord`` with ``tf.io.TFRecordWriter``. No validation, no split, no cache: a
re-run does all the work again.
"""

import io
import os
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import tensorflow as tf  # noqa: E402
from PIL import Image  # noqa: E402


def feature(value):
    if isinstance(value, int):
        return tf.train.Feature(int64_list=tf.train.Int64List(value=[value]))
    return tf.train.Feature(bytes_list=tf.train.BytesList(value=[value]))


def main() -> None:
    root, out = Path(sys.argv[1]), Path(sys.argv[2])
    size = int(sys.argv[sys.argv.index("--image-size") + 1]) if "--image-size" in sys.argv else 128
    out.mkdir(parents=True, exist_ok=True)
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    count = 0
    with tf.io.TFRecordWriter(str(out / "train.tfrecord")) as writer:
        for label, name in enumerate(classes):
            for folder, _, names in os.walk(root / name):
                for file in sorted(names):
                    with Image.open(Path(folder) / file) as image:
                        pixels = image.convert("RGB").resize((size, size), Image.Resampling.BILINEAR)
                    buffer = io.BytesIO()
                    pixels.save(buffer, format="JPEG", quality=95)
                    example = tf.train.Example(features=tf.train.Features(feature={
                        "image/encoded": feature(buffer.getvalue()), "image/class/label": feature(label),
                    }))
                    writer.write(example.SerializeToString())
                    count += 1
    print(f"{count} images -> {out}")


if __name__ == "__main__":
    main()
