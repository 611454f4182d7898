"""The one interface every sequential recommender implements.

A model is: item embedding (id 0 = padding) -> encoder -> hidden states. Scores are the tied dot
product of a hidden state with the item embedding table, so models differ only in their encoder.
Each model class declares what it needs and supports, so the harness can check a configuration
(timestamps present, training protocol allowed, kernel backend available) before any work starts.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable
from typing import Any, ClassVar

import torch
from torch import nn

from .kernels.backends import CPU_BACKEND, KernelBackendError, parse_backend_request, resolve_backend
from .kernels.cross_entropy import tied_cross_entropy
from .kernels.dropout import ACTIVATIONS, activated_dropout_cpp, dropout_cpp

#: the kernels every model runs (its dropout layers, its training loss), beside a model's own `kernels`
COMMON_KERNELS = ("dropout", "cross_entropy")


def drop_mask(shape: torch.Size, p: float, device: torch.device) -> torch.Tensor:
    """Boolean Bernoulli(p) mask of the elements to drop: 32 random bits per element, dropped where
    they fall below p * 2^32.

    The CPU generator's cost is per draw, and one 64-bit draw gives two 32-bit words: about 2x cheaper
    than `rand_like` (one draw per float, of which 24 bits are used) and 3x cheaper than `bernoulli_`,
    which dominated training profiles. The drop probability is round(p * 2^32) / 2^32, finer than a
    float32 uniform's 2^-24 grid. `random_(-2**63, None)` draws the full 64-bit range; plain `random_()`
    on int64 leaves the top bit 0, which would bias the high word.
    """
    count = math.prod(shape)
    words = torch.empty((count + 1) // 2, dtype=torch.int64, device=device).random_(-(2**63), None)
    words = words.view(torch.int32)[:count].view(shape)  # uniform on [-2^31, 2^31)
    return words < round(p * 2**32) - 2**31


class Dropout(nn.Dropout):
    """nn.Dropout with cheaper CPU paths: the C++ kernel (kernels/dropout.py) where the model chose the "cpp"
    backend for its dropout, else a cheaper torch mask (`drop_mask`); other devices use torch's fused kernel
    unchanged. Every model uses this class, so a seed gives the same masks on every model path of one backend."""

    backend = "torch"  # until the owning model's set_kernel_backend chooses
    fused_backend = "torch"  # of an activation before it (`after_activation`): kernel "activation_dropout"

    def set_backends(self, backends: dict[str, str]) -> None:
        self.backend = backends.get("dropout", self.backend)
        self.fused_backend = backends.get("activation_dropout", self.fused_backend)

    def _masks_on_cpu(self, x: torch.Tensor) -> bool:
        """Whether this call draws its mask here, on the CPU (else torch's own dropout runs, or nothing)."""
        return self.training and 0.0 < self.p < 1.0 and x.device.type == "cpu" and not self.inplace

    def _runs_cpp(self, x: torch.Tensor, backend: str) -> bool:
        return self._masks_on_cpu(x) and backend == CPU_BACKEND and x.dtype in (torch.float32, torch.float64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._runs_cpp(x, self.backend):
            return dropout_cpp(x, self.p)
        if self._masks_on_cpu(x):
            return _MaskedScale.apply(x, drop_mask(x.shape, self.p, x.device), 1.0 / (1.0 - self.p))
        if self.training and self.p == 1.0 and x.device.type == "cpu" and not self.inplace:
            return x * 0.0
        return super().forward(x)

    def after_activation(self, activation: str, x: torch.Tensor) -> torch.Tensor:
        """self(activation(x)), `activation` a name in kernels.dropout.ACTIVATIONS; on the C++ backend of
        kernel "activation_dropout" one kernel each way (the masks of the C++ dropout after the same seed)."""
        if self._runs_cpp(x, self.fused_backend):
            return activated_dropout_cpp(x, activation, self.p)
        return self(ACTIVATIONS[activation](x))


class _MaskedScale(torch.autograd.Function):
    """x zeroed where `dropped`, the rest scaled by 1 / (1 - p); saves the boolean mask (1 byte per
    element) instead of a float scale tensor."""

    @staticmethod
    def forward(ctx, x, dropped, scale):
        ctx.save_for_backward(dropped)
        ctx.scale = scale
        return x.mul(scale).masked_fill_(dropped, 0.0)  # two passes over memory, not three

    @staticmethod
    def backward(ctx, grad):
        (dropped,) = ctx.saved_tensors
        return grad.mul(ctx.scale).masked_fill_(dropped, 0.0), None, None


class ModelConfigError(ValueError):
    """A model configuration that cannot be built (unknown key, impossible shape)."""


@dataclasses.dataclass(frozen=True)
class OptionInfo:
    """One model option as `train --list-options` shows it."""

    name: str
    kind: str  # int, float, bool, str
    default: Any
    choices: tuple  # the allowed values of an option that takes a name; () for any value of its type
    help: str


@dataclasses.dataclass
class ModelConfig:
    """Hyper-parameters shared by every model; subclasses add their own fields with defaults, a line
    of HELP for each, and the allowed values of those that take a name in CHOICES (tests/test_waiting.py
    checks that every option has its line)."""

    hidden_size: int = 64
    dropout: float = 0.2

    HELP: ClassVar[dict[str, str]] = {
        "hidden_size": "width of the item embeddings and hidden states",
        "dropout": "dropout probability on the hidden states, in [0, 1)",
    }
    CHOICES: ClassVar[dict[str, tuple]] = {}

    @classmethod
    def options(cls) -> list[OptionInfo]:
        """Every option with its type, default, allowed values and description (HELP and CHOICES
        merged over the class and its bases, the most derived first)."""
        help_text: dict[str, str] = {}
        choices: dict[str, tuple] = {}
        for klass in reversed(cls.__mro__):
            help_text.update(vars(klass).get("HELP", {}))
            choices.update(vars(klass).get("CHOICES", {}))
        out = []
        for field in dataclasses.fields(cls):
            kind = field.type if isinstance(field.type, str) else getattr(field.type, "__name__", "")
            default = field.default_factory() if field.default_factory is not dataclasses.MISSING else field.default
            out.append(
                OptionInfo(field.name, kind, default, tuple(choices.get(field.name, ())), help_text.get(field.name, ""))
            )
        return out

    @classmethod
    def from_dict(cls, values: dict[str, Any], model_name: str = "") -> ModelConfig:
        known = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise ModelConfigError(
                f"unknown option(s) {unknown} for model {model_name or cls.__name__}; valid options: {sorted(known)}"
            )
        coerced = {k: _coerce(known[k], v, model_name) for k, v in values.items()}
        config = cls(**coerced)
        config.validate()
        return config

    def validate(self) -> None:
        if self.hidden_size <= 0:
            raise ModelConfigError(f"hidden_size must be positive, got {self.hidden_size}")
        if not 0.0 <= self.dropout < 1.0:
            raise ModelConfigError(f"dropout must be in [0, 1), got {self.dropout}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def variant(self) -> str:
        """A short name for options that make this another model than the registered one (a run
        of it goes by `<model>-<variant>`, so it is never shown or tested as the registered model);
        "" when the options keep the model what it is."""
        return ""


def _coerce(field: dataclasses.Field, value: Any, model_name: str) -> Any:
    """Coerce CLI/YAML strings and ints to the declared field type, or fail with one clear line."""
    kind = field.type if isinstance(field.type, str) else getattr(field.type, "__name__", "")
    try:
        if kind == "bool":
            if isinstance(value, str):
                if value.lower() in ("true", "1", "yes"):
                    return True
                if value.lower() in ("false", "0", "no"):
                    return False
                raise ValueError(value)
            return bool(value)
        if kind == "int":
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return int(value)
        if kind == "float":
            return float(value)
    except (TypeError, ValueError):
        raise ModelConfigError(f"option {field.name}={value!r} for model {model_name} must be of type {kind}") from None
    return value


def resolve_kernel_backends(
    model_name: str, kernels: Iterable[str], requested: str, device: torch.device | str
) -> dict[str, str]:
    """Resolve the requested backend ("auto", "torch", "cpp", "triton"/"cuda", with optional per-kernel overrides
    such as "cpp:dropout=torch", see parse_backend_request) for each kernel once.

    A backend that does not exist or cannot run here, or an override of a kernel the model lacks, is a
    configuration error (never a silent fallback, except that "auto" picks the torch twin where the GPU library
    or the C++ build is missing).
    """
    kernels = tuple(kernels)
    try:
        base, overrides = parse_backend_request(requested)
        missing = sorted(set(overrides) - set(kernels))
        if missing:
            raise KernelBackendError(
                f"has no kernel {', '.join(missing)} to override (its kernels: {', '.join(kernels)})"
            )
        if "dropout" in overrides and "activation_dropout" in kernels:
            # the FFN's dropout runs inside activation_dropout when fused: "dropout=torch" (torch's masks) means it
            # too, unless that kernel is overridden itself
            overrides.setdefault("activation_dropout", overrides["dropout"])
        return {kernel: resolve_backend(kernel, overrides.get(kernel, base), device) for kernel in kernels}
    except KernelBackendError as err:
        raise ModelConfigError(f"model {model_name!r}: {err}") from None


class SequentialRecommender(nn.Module):
    """Base class: item embedding table, an encoder defined by the subclass, tied scoring.

    Subclasses set the class attributes below and implement `encode`.
    """

    name: ClassVar[str] = ""
    config_class: ClassVar[type[ModelConfig]] = ModelConfig
    #: the model reads the timestamp sequence
    uses_timestamps: ClassVar[bool] = False
    #: widths a model picks inside `encode` (a trimmed path) are rounded up to a multiple of this
    width_multiple: int = 1

    #: the model's own kernels (models.kernels), beside the COMMON_KERNELS every model runs
    kernels: ClassVar[tuple[str, ...]] = ()

    def __init__(self, n_items: int, max_len: int, config: ModelConfig):
        super().__init__()
        self.n_items = n_items
        self.max_len = max_len
        self.config = config
        self._backends = {kernel: "torch" for kernel in (*self.kernels, *COMMON_KERNELS)}
        # +1 for the padding id 0; padding_idx keeps its row at zero and out of the gradient.
        self.item_embedding = nn.Embedding(n_items + 1, config.hidden_size, padding_idx=0)

    # --- capabilities that may depend on the configuration (a causal time path, say) ---
    @property
    def is_causal(self) -> bool:
        """No position's output depends on a later position: all_positions training is valid."""
        return True

    @property
    def trims_padding(self) -> bool:
        """Outputs at real positions do not depend on trailing padding, so the batch may be cut
        to its longest real sequence before `encode`."""
        return True

    def encode(
        self, items: torch.Tensor, timestamps: torch.Tensor | None, at: torch.Tensor | None = None
    ) -> torch.Tensor:
        """items [batch, length] (right-padded with 0), timestamps [batch, length] float or None.

        Returns hidden states [batch, length', hidden] with length' >= the longest real sequence;
        only positions before each sequence's length are meaningful. With `at` ([batch] positions),
        returns only the hidden state at at[b], [batch, hidden]: the last layer then computes its
        position-wise parts (queries, feed-forward, output projections) at that one position, which
        is exact because nothing in a causal item path reads a later position, and is what the prefix
        protocol and evaluation read.
        """
        raise NotImplementedError

    def score(self, hidden: torch.Tensor) -> torch.Tensor:
        """Tied scores over every item id, padding included (callers mask id 0)."""
        return hidden @ self.item_embedding.weight.t()

    def loss(self, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean full-softmax cross-entropy of the tied scores over every item id, padding included (as
        in RecBole, whose CE also normalises over id 0); fused on CPU (kernels/cross_entropy.py)."""
        return tied_cross_entropy(hidden, self.item_embedding.weight, targets, self._backends["cross_entropy"])

    def last_hidden(self, items: torch.Tensor, timestamps: torch.Tensor | None, lengths: torch.Tensor) -> torch.Tensor:
        """Hidden state at each sequence's last real position: [batch, hidden]."""
        return self.encode(items, timestamps, at=(lengths - 1).clamp(min=0))

    def set_kernel_backend(self, requested: str, device: torch.device) -> None:
        """Resolve the backend of each kernel once and hand the choice to every submodule that has
        `set_backends`. Every model has C++ kernels (its dropout, its loss), so an explicit "cpp" always runs some C++."""
        self._backends = resolve_kernel_backends(self.name, (*self.kernels, *COMMON_KERNELS), requested, device)
        for module in self.modules():
            if module is not self and hasattr(module, "set_backends"):
                module.set_backends(self._backends)

    def backend_report(self) -> dict[str, str]:
        """Kernel backend actually used per kernel, recorded with every run."""
        return dict(self._backends)

    def n_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)


def round_up_width(width: int, multiple: int, cap: int) -> int:
    """`width` rounded up to a multiple of `multiple`, at most `cap`: the few sequence widths a
    compiled encoder meets (harness/compiling.py pads batches to them; TiM4Rec trims its item path
    to them)."""
    return min(-(-width // multiple) * multiple, cap)


def at_positions(x: torch.Tensor, at: torch.Tensor) -> torch.Tensor:
    """x [batch, length, ...] at one position per row: [batch, 1, ...]."""
    index = at.view(-1, 1, *([1] * (x.dim() - 2))).expand(-1, 1, *x.shape[2:])
    return x.gather(1, index)


def recbole_init_(module: nn.Module, std: float = 0.02, kaiming_conv: bool = False) -> None:
    """RecBole's `_init_weights`, as every model here (and the official code of each) applies it
    with Module.apply: Linear and Embedding weights N(0, std), Linear biases 0, LayerNorm (1, 0).

    As in RecBole, the padding row of the item table is overwritten too: it stays a fixed random
    vector (padding_idx blocks its gradient), and it takes part in the training softmax. Conv1d keeps
    PyTorch's default unless `kaiming_conv` (TiM4Rec's and SSD4Rec*'s is_kai_ming_init): kaiming_normal
    (fan_out, relu) and zero bias. Plain Parameters (an SSM's A_log, D, dt_bias) and other norms are
    untouched.
    """
    if isinstance(module, (nn.Linear, nn.Embedding)):
        module.weight.data.normal_(mean=0.0, std=std)
    elif isinstance(module, nn.Conv1d) and kaiming_conv:
        nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        if module.bias is not None:
            module.bias.data.zero_()
    elif isinstance(module, nn.LayerNorm):
        module.weight.data.fill_(1.0)
        module.bias.data.zero_()
    if isinstance(module, nn.Linear) and module.bias is not None:
        module.bias.data.zero_()
