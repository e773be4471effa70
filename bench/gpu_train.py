"""GPU check: images/s of the default model, float32 vs mixed precision, host-fed vs on-device batches.

Self-contained: Keras 3 only, data from in-memory arrays, so it also runs where only JAX
is installed (``KERAS_BACKEND=jax``); TensorFlow is not needed. Each configuration builds
the built-in default CNN (``imgflow.tasks.models.build_model``) in a fresh process-wide dtype
policy and times ``train_on_batch`` after warm-up steps (compilation excluded):

- host: every step gets a new NumPy batch from host memory (transfer each step), the
  way a host-side input pipeline feeds the GPU;
- device: the same batch already converted to a backend tensor on the accelerator
  (synthetic on-device data: the upper bound with no input cost).

    KERAS_BACKEND=jax python bench/gpu_train.py [--image-size 128] [--batch-size 128] [--steps 30]

Prints one line per configuration and the speed-ups; record the GPU model with the figures.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def device_description() -> str:
    """The accelerator(s) the Keras backend sees, in words."""
    import keras

    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        return ", ".join(f"{d.platform}:{getattr(d, 'device_kind', d)}" for d in jax.devices())
    if backend == "tensorflow":
        import tensorflow as tf

        gpus = tf.config.list_physical_devices("GPU")
        names = [tf.config.experimental.get_device_details(g).get("device_name", g.name) for g in gpus]
        return ", ".join(names) or "CPU only"
    if backend == "torch":
        import torch

        return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU only"
    return backend


def images_per_second(precision: str, feed: str, image_size: int, batch_size: int, steps: int,
                      warmup: int, num_classes: int = 10, seed: int = 0) -> float:
    """Train the default model ``steps`` steps and return images/s (after ``warmup`` steps)."""
    import keras
    import numpy as np

    from imgflow.tasks.models import build_model, compile_model

    keras.config.set_dtype_policy(precision)
    try:
        keras.utils.set_random_seed(seed)
        model = build_model("default", image_size, num_classes, steps_per_epoch=steps, seed=seed)
        compile_model(model, "adam", 1e-3, jit_compile=True)
        rng = np.random.default_rng(seed)
        # a few distinct host batches so each step really copies new data
        host_x = [rng.integers(0, 256, (batch_size, image_size, image_size, 3), dtype=np.uint8).astype("float32")
                  for _ in range(4)]
        host_y = [rng.integers(0, num_classes, (batch_size,)).astype("int32") for _ in range(4)]
        device_x = keras.ops.convert_to_tensor(host_x[0])
        device_y = keras.ops.convert_to_tensor(host_y[0])

        def step(i: int) -> None:
            if feed == "host":
                model.train_on_batch(host_x[i % 4], host_y[i % 4])
            else:
                model.train_on_batch(device_x, device_y)

        for i in range(warmup):
            step(i)
        started = time.perf_counter()
        for i in range(steps):
            step(i)
        # train_on_batch returns Python floats: the last step has finished on the device
        return steps * batch_size / (time.perf_counter() - started)
    finally:
        keras.config.set_dtype_policy("float32")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    args = parser.parse_args()

    import keras

    print(f"backend {keras.backend.backend()} (keras {keras.__version__}); devices: {device_description()}")
    print(f"default model, {args.image_size} px, batch {args.batch_size}, {args.steps} timed steps "
          f"after {args.warmup} warm-up steps, XLA on")
    results: dict[tuple[str, str], float] = {}
    for precision in ("float32", "mixed_float16"):
        for feed in ("host", "device"):
            rate = images_per_second(precision, feed, args.image_size, args.batch_size, args.steps, args.warmup)
            results[(precision, feed)] = rate
            print(f"{precision:>14} {feed:>6}-fed: {rate:10.1f} images/s", flush=True)
    for feed in ("host", "device"):
        print(f"mixed precision speed-up ({feed}-fed): "
              f"{results[('mixed_float16', feed)] / results[('float32', feed)]:.2f}x")
    for precision in ("float32", "mixed_float16"):
        print(f"host-fed share of on-device speed ({precision}): "
              f"{results[(precision, 'host')] / results[(precision, 'device')]:.2f}")


if __name__ == "__main__":
    main()
