"""The script a user writes instead of ``imgflow predict``: Keras's folder loader, predict, pandas.

    python bench/plain_predict.py MODEL_DIR INPUT_DIR OUT.csv [--batch-size 256]

``keras.utils.image_dataset_from_directory(labels=None, shuffle=False)`` (tf.data decode +
bilinear resize, in parallel) -> ``model.predict`` -> a pandas CSV with imgflow's columns
(``path``, ``label``, ``confidence``, ``prob_<class>``, ``error``). It holds every
file's path and probabilities in memory, does not resume, and stops at the first
unreadable file: what imgflow is compared against in ``bench/vs_plain.py``.
"""

import json
import os
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402


def main() -> None:
    model_dir, input_dir, out = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
    batch_size = int(sys.argv[sys.argv.index("--batch-size") + 1]) if "--batch-size" in sys.argv else 256
    meta = json.loads((model_dir / "metadata.json").read_text())
    size, classes = int(meta["image_size"]), list(meta["class_names"])
    model = keras.saving.load_model(model_dir / "model.keras")
    ds = keras.utils.image_dataset_from_directory(
        input_dir, labels=None, shuffle=False, image_size=(size, size), batch_size=batch_size, verbose=False
    )
    probs = model.predict(ds, verbose=0)
    frame = pd.DataFrame({
        "path": [os.path.relpath(p, input_dir) for p in ds.file_paths],
        "label": [classes[i] for i in np.argmax(probs, axis=1)],
        "confidence": probs.max(axis=1),
        **{f"prob_{name}": probs[:, i] for i, name in enumerate(classes)},
        "error": "",
    })
    frame.to_csv(out, index=False, float_format="%.6f")
    print(f"{len(frame)} rows -> {out}")


if __name__ == "__main__":
    main()
