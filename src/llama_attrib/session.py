"""What llama_attrib keeps on one wrapped model: its patches and the pass that is running.

All state lives on a :class:`Session` stored on the model instance (never in module
globals), so two wrapped models never share anything. Each leaf module's replacement forward
is one dispatch: to the active pass's method for its role (:mod:`llama_attrib.passes`), or,
with none active, to the stock forward. What a decomposing call needs and collects lives on
its pass; what a ``generate`` call coordinates lives on a generation object its adapter
creates (:class:`Recording`, :class:`Collecting`).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from . import families, quantized, rules
from ._attention import PROBE, ConfigView, Probe, register_attention
from .errors import DecompositionError
from .families import Family
from .passes import Pass
from .patching import Patch, replace_method, replace_value, restore_all
from .rules.attention import ValueCaches

Forward = Callable[..., Any]
SENTINEL = "_llama_attrib_session"  # where a wrapped model keeps its Session (its __dict__)


@dataclass
class Recording:
    """A target-mode ``generate``: its forwards run plain, and the attention mask and position
    ids of each are recorded (the pass afterwards uses the same)."""

    inputs: list[tuple[Any, Any]] = field(default_factory=list)


@dataclass
class Collecting:
    """A forward-mode ``generate``: each of its forwards decomposes and leaves its step's
    composition here; ``expected_length``: the final sequence length, to size the caches."""

    expected_length: int = 0
    steps: list[Any] = field(default_factory=list)


class Session:
    """One wrapped model's family, patches, decomposed value caches, the active pass (if any)
    and the ``generate`` call in progress (if any)."""

    def __init__(self, model: nn.Module, family: Family) -> None:
        self.family = family
        self.dtype = families.component_dtype(model)  # the components' default dtype
        self.model_dtype = families.model_dtype(model)  # the hidden states' dtype
        self.logit_scale = family.logit_scale(model)
        self.rule_set: rules.RuleSet = rules.EXACT  # the rule set of calls that name none
        self.patches: list[Patch] = []
        self.forward: Forward | None = None  # the model's own top-level forward, as installed over
        self.forced = 0  # depth of enclosing ``decompose()`` blocks
        self.active: Pass | None = None
        self.generation: Recording | Collecting | None = None
        self.caches = ValueCaches()
        self.last_layer: set[int] = set()  # the last layer's attention and MLP
        # one call at a time (the adapters and the engines hold it): a decomposing call changes
        # how the shared modules run, and a call from another thread waits for it to end
        self.lock = threading.RLock()

    def wants(self, decompose: bool | str | None) -> bool:
        """Whether a call decomposes: an explicit ``decompose=`` wins over the context."""
        if decompose is not None:
            return decompose is not False
        if isinstance(self.generation, Recording):
            return False
        return self.forced > 0 or isinstance(self.generation, Collecting)

    @contextmanager
    def running(self, active: Pass) -> Iterator[Pass]:
        """Make ``active`` the pass every leaf module hands its call to, for the block."""
        if self.active is not None:
            raise DecompositionError("a decomposed forward was called from inside another one")
        active.begin(self)
        self.active = active
        try:
            yield active
        except BaseException:
            active.failed()
            raise
        finally:
            self.active = None
            quantized.forget()  # the dequantized weights the pass kept

    def install(self, model: nn.Module) -> None:
        """Patch every role's forward; on any failure undo what was done."""
        self.forward = model.forward  # the top level's own: the engines' plain forward
        last_layer = self.family.layers(model)[-1]
        self.last_layer = {
            id(m) for _, role, m in self.family.layer_modules(last_layer) if role != families.NORM
        }
        register_attention()
        try:
            for role, module in families.roles(model, self.family):
                self.patches.append(replace_method(module, "forward", self._leaf(role, module)))
                if role == families.ATTENTION:
                    probe = Probe()
                    self.patches.append(replace_value(module, PROBE, probe))
                    # the module's own view of the config: its attention implementation is
                    # llama_attrib's function while the probe runs (the model's config is untouched)
                    self.patches.append(replace_value(module, "config", ConfigView(module.config, probe)))
        except BaseException:
            restore_all(self.patches)
            raise

    def restore(self) -> None:
        restore_all(self.patches)
        self.caches.clear()

    def plain(self, **kwargs: Any) -> Any:
        """The model's own top-level forward (not a wrapper's), its leaves dispatching to the
        active pass: what the engines run a pass with."""
        assert self.forward is not None, "the session is installed"
        return self.forward(**kwargs)

    def _leaf(self, role: str, module: nn.Module) -> Callable[[Forward], Forward]:
        """The replacement forward of a leaf module: the active pass's method for ``role``."""

        def make(original: Forward) -> Forward:
            def forward(*args: Any, **kwargs: Any) -> Any:
                active = self.active
                if active is None:
                    return original(*args, **kwargs)
                handle: Callable[..., Any] = getattr(active, role)
                return handle(module, original, args, kwargs)

            return forward

        return make


def session_of(model: nn.Module) -> Session | None:
    """The Session of a wrapped model, else None."""
    found: Session | None = model.__dict__.get(SENTINEL)
    return found


@contextmanager
def attached(model: nn.Module) -> Iterator[Session]:
    """The one way a call attaches to a model: a wrapped model's own session, or, on a model
    that is not wrapped (never, or unwrapped since), a session installed for the block and
    restored exactly on exit, also after an exception. Held under the session's lock: one
    call at a time."""
    session = session_of(model)
    if session is not None:
        with session.lock:
            yield session
        return
    session = Session(model, families.check(model))
    session.install(model)
    try:
        with session.lock:
            yield session
    finally:
        session.restore()
