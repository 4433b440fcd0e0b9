"""Engines: where saved-tensor hooks meet the policy, the strategies and the codecs.

:mod:`~actpack.engine.eager` installs ``torch.autograd.graph.saved_tensors_hooks``
around eager forwards; :mod:`~actpack.engine.accounting` counts bytes exactly;
:mod:`~actpack.engine.tracking` names the op and module saving each tensor;
:mod:`~actpack.engine.savefacts` reads the op's arguments, the calling frame
and the autograd graph behind a save; :mod:`~actpack.engine.saved` holds what
autograd keeps instead; :mod:`~actpack.engine.compiled`,
:mod:`~actpack.engine.graphfacts` and :mod:`~actpack.engine.graphcodes` are
the hooks AOTAutograd inlines into compiled graphs;
:mod:`~actpack.engine.offload` swaps packed data to host memory (ActNN L4/L5).
"""

from actpack.engine.eager import DEFAULT_MIN_NUMEL, Engine

__all__ = ["DEFAULT_MIN_NUMEL", "Engine"]
