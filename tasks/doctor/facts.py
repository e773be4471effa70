"""What a model and its run actually have, and advice built only from that. Pure, no Keras.

The doctor must never recommend what is already there ("add Rescaling(1/255)" to a model
that has it, "use softmax" for a softmax head): every advice sentence is put together
here from :class:`RunFacts`, which :func:`imgflow.tasks.doctor.checks.model_facts`
reads off the real model.
"""

from __future__ import annotations

from dataclasses import dataclass, field

# The usual learning rate of each optimizer (Keras defaults; SGD's common starting point).
TYPICAL_LR = {"adam": 1e-3, "adamw": 1e-3, "rmsprop": 1e-3, "nadam": 1e-3, "adamax": 1e-3, "lion": 1e-4,
              "sgd": 1e-2, "adagrad": 1e-2, "adadelta": 1.0}


@dataclass(frozen=True)
class RunFacts:
    """Facts about the model and the run that advice may rely on (None: unknown).

    Attributes:
        input_scaling: a Rescaling/Normalization layer (or another normalising layer
            before the first weights) is in the model.
        scaling_layer: the name of that layer.
        head_activation: the output layer's activation (``softmax``, ``relu``, ``linear``...).
        head_layer: the output layer's name.
        from_logits: the compiled loss takes logits.
        optimizer: the optimizer's name in lower case (``adam``, ``sgd``...).
        learning_rate: the optimizer's initial learning rate.
        batch_size: images per training step.
        class_counts: training images per class, in label order.
        class_names: class names in label order.
        num_classes: number of classes.
    """

    input_scaling: bool | None = None
    scaling_layer: str | None = None
    head_activation: str | None = None
    head_layer: str | None = None
    from_logits: bool | None = None
    optimizer: str | None = None
    learning_rate: float | None = None
    batch_size: int | None = None
    class_counts: tuple[int, ...] = field(default_factory=tuple)
    class_names: tuple[str, ...] = field(default_factory=tuple)
    num_classes: int = 0

    def with_updates(self, **changes: object) -> "RunFacts":
        """A copy with some facts filled in (None values leave a fact as it was)."""
        current = dict(self.__dict__)
        current.update({k: v for k, v in changes.items() if v is not None})
        for key in ("class_counts", "class_names"):
            current[key] = tuple(current[key] or ())
        return RunFacts(**current)

    # -- derived facts
    @property
    def head_is_probabilities(self) -> bool:
        """The head outputs class probabilities the loss expects (softmax, loss not from logits)."""
        return self.head_activation == "softmax" and not self.from_logits

    @property
    def head_is_right(self) -> bool | None:
        """Softmax with a probability loss, or a linear head with ``from_logits=True``."""
        if self.head_activation is None:
            return None
        if self.from_logits:
            return self.head_activation in ("linear", None)
        return self.head_activation == "softmax"

    @property
    def typical_lr(self) -> float | None:
        """The usual learning rate of this optimizer, when known."""
        return TYPICAL_LR.get(self.optimizer or "")

    @property
    def lr_ratio(self) -> float | None:
        """The learning rate divided by the optimizer's usual one."""
        if self.learning_rate is None or self.typical_lr is None or not self.learning_rate > 0:
            return None
        return self.learning_rate / self.typical_lr

    def class_label(self, index: int) -> str:
        """``'cats' (class 1)`` when names are known, else ``class 1``."""
        if 0 <= index < len(self.class_names):
            return f"'{self.class_names[index]}' (class {index})"
        return f"class {index}"


# --------------------------------------------------------------------------- advice pieces


def fix_inputs(facts: RunFacts) -> str | None:
    """"Add Rescaling(1/255)" — only when the model has no input scaling."""
    if facts.input_scaling:
        return None
    return "add `Rescaling(1/255)` as the first layer so the model sees values in [0, 1]"


def fix_head(facts: RunFacts) -> str | None:
    """"Use a softmax head" — only when the head is not already right for the loss."""
    if facts.head_is_right:
        return None
    k = facts.num_classes or "K"
    where = f" (the output layer {facts.head_layer} uses {facts.head_activation or 'no'} activation)" if facts.head_layer else ""
    return f"end the model with `Dense({k}, activation='softmax')`{where}"


def fix_learning_rate(facts: RunFacts, factor: float = 10.0) -> str:
    """"Lower the learning rate from X to Y", naming the optimizer and its usual rate."""
    opt = facts.optimizer or "the optimizer"
    if facts.learning_rate is None or not facts.learning_rate > 0:
        return f"lower the learning rate of {opt} {factor:.0f}x"
    target = facts.learning_rate / factor
    if facts.typical_lr is not None and facts.lr_ratio is not None and facts.lr_ratio > factor:
        target = facts.typical_lr
    usual = f" ({opt}'s usual rate is {facts.typical_lr:.0e})" if facts.typical_lr is not None else ""
    return f"lower the learning rate of {opt} from {facts.learning_rate:.3g} to {target:.3g}{usual}"


def join(fixes: list[str | None], fallback: str) -> str:
    """Join the applicable fixes with commas and a final "and"; ``fallback`` when none apply."""
    parts = [f for f in fixes if f]
    if not parts:
        return fallback
    if len(parts) == 1:
        return parts[0]
    return ", ".join(parts[:-1]) + " and " + parts[-1]
