"""The default of every CompreSSM compression setting, defined once.

:class:`~compressm_hf.CompreSSMCallback`, :class:`~compressm_hf.trainer.CompressionSchedule`,
``compressm-train`` and ``compressm-analyze`` all read their defaults from here, so a setting left
alone means the same thing in Python and on the command line. Each value is the paper's
(Chahine et al., *The Curious Case of In-Training Compression of State Space Models*, arXiv 2510.02823,
and its reference code), with the reasoning:

* ``WINDOW = (0.0, 0.1)`` and ``ATTEMPTS = 4``: the paper attempts a reduction at 4 equally spaced points
  inside the learning-rate warm-up, the first 10 % of the steps (for sCIFAR at 4.5k, 9k, 13.5k and 18k of
  180k). By then the Hankel spectrum of each layer has settled enough to rank its states, and 90 % of the
  training still runs on the smaller model, which is where the speed-up comes from.
* ``STATISTICS_STEPS = 8``: Mamba layers are selective; their averaged LTI surrogate is built from running
  statistics of this many real training batches before each attempt (an LTI layer such as the LRU needs
  none). Attempts closer together than this get fewer batches: see
  :class:`~compressm_hf.trainer.schedule.ShortRunWarning`.
* ``GATE = 0.95``: a layer is cut only if its new size is below 95 % of its current one, the paper's (and the
  reference code's hard-coded) gate, so that a cut is worth rebuilding the optimizer state for.
* ``MIN_STATE_SIZE = 1`` and ``ROUND_TO = 1``: the paper's rank rule alone decides the size (its code keeps
  at least one state and does not round); raise them for kernel-friendly sizes.
* ``SELECTION = "largest"``: keep the states with the largest Hankel singular values (balanced truncation);
  ``"smallest"`` and ``"random"`` are the paper's App. C.1 ablations.
* ``FIXED_FRACTION = 0.1`` and ``PRAGMATIC_TOLERANCE = 0.02``: the paper's "fixed" and "pragmatic" modes cut
  10 % of the states per attempt, and pragmatic mode rolls back when the evaluation metric drops by more
  than 0.02.
* ``OPTIMIZER_STATE = "slice"``: the Adam moments of the kept states are carried over (the reference code's
  ``truncate_optimizer_state``), so training continues without a restart.

* ``TAU = 0.1``: the discarded fraction of each layer's sum of Hankel singular values per attempt, for
  ``CompreSSMCallback()`` and ``compressm-train`` alike (``CLI_TAU`` is the same value, kept as an alias).
  The paper's grid for CIFAR and LRA is {0.02, 0.03, 0.05, 0.07, 0.10, 0.15}; 0.1 compresses clearly at
  every attempt without being the grid's most aggressive. ``compressm-analyze compress`` (a one-off cut of
  a trained model) still asks for ``--tau`` explicitly.
* ``ON_NONFINITE = "warn"``, ``BUDGET_SCHEDULE = "geometric"``, ``SEED = 0``: not from the paper; a diverged
  attempt is skipped with a warning (not a stop), a state budget is approached in equal-ratio steps, and the
  ``selection="random"`` ablation draws reproducibly.

:class:`~compressm_hf.settings.CompreSSMConfig` holds every setting with these defaults (one dataclass, one
vocabulary); the callback and both CLIs build it.
"""

from __future__ import annotations

__all__ = [
    "ATTEMPTS",
    "BUDGET_SCHEDULE",
    "CLI_TAU",
    "TAU",
    "FIXED_FRACTION",
    "GATE",
    "MIN_STATE_SIZE",
    "MODE",
    "ON_NONFINITE",
    "OPTIMIZER_STATE",
    "PRAGMATIC_TOLERANCE",
    "ROUND_TO",
    "SEED",
    "SELECTION",
    "STATISTICS_STEPS",
    "WINDOW",
]

MODE = "tolerance"
WINDOW: tuple[float, float] = (0.0, 0.1)
ATTEMPTS = 4
STATISTICS_STEPS = 8
GATE = 0.95
MIN_STATE_SIZE = 1
ROUND_TO = 1
SELECTION = "largest"
FIXED_FRACTION = 0.1
PRAGMATIC_TOLERANCE = 0.02
OPTIMIZER_STATE = "slice"
TAU = 0.1
CLI_TAU = TAU
ON_NONFINITE = "warn"
BUDGET_SCHEDULE = "geometric"
SEED = 0
