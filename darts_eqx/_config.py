"""What a search computes: `SearchConfig`. How it is run (chunking, tracing, kernels, devices)
is an `Execution` (`_execution.py`), kept apart so that it never changes a search's identity."""

from dataclasses import dataclass

from ._checks import non_negative, positive, positive_ints, replace_known
from ._second_order import ESTIMATORS
from ._spaces import get_space


@dataclass(frozen=True)
class SearchConfig:
    """Search options; the defaults are the paper's CIFAR-10 search (Liu et al., 2019, App. A.1).

    - `space`: the name of a registered space (`darts_eqx.register_space`); built in: `darts`
      (the CIFAR search network), `nb201` (NAS-Bench-201's; `layers` is cells per stage) and
      `seed` (one mixed-op layer type).
    - `channels`, `layers`: initial channels C and number of cells.
    - `epochs`, `batch_size`: an epoch is `min(len(search_train), len(search_val)) // batch_size`
      steps; each step takes one batch from each half.
    - `train_portion`: share of the training set used to train weights; the rest trains alpha.
    - `augment`: random crop (4-pixel zero padding at 32x32, scaled with the image) and horizontal
      flip of every batch, the weights' and alpha's, as the DARTS search code's CIFAR transform;
      without it a small training set is memorised within the search and the architecture
      gradient follows the overfitted weights. Turn it off where a mirror image changes the label
      (the embedded digits: the command line does).
    - `w_*`: SGD for weights (lr cosine-annealed per epoch to `w_lr_min`, momentum, L2 weight
      decay), gradients clipped to global norm `grad_clip`.
    - `a_*`: Adam for alpha, with L2 weight decay added to the gradient as PyTorch's Adam does.
    - `order`: 1 for first-order DARTS, 2 for the unrolled architecture gradient (`arch_gradient`)
      with `estimator` `exact` (differentiated through the virtual weight step) or
      `finite_difference` (the paper's Eq. 8); `xi` is the virtual step size (None: the current
      weight lr, as the paper). With order 2 the recorded val loss/acc are at the unrolled weights.
    - `method`: the DARTS variant, with its authors' defaults (`darts_eqx.methods`): `darts` (the
      paper's), `gdas` (Gumbel-max sampling of one op per edge), `drnas` (Dirichlet op weights),
      `sdarts-rs` and `sdarts-adv` (random and adversarial perturbation in the weight step) or
      `fairdarts` (independent sigmoids, zero-one loss). `gdas`, `drnas` and `fairdarts` are
      first order; the others combine with `order`; all with `beta_reg`, and all but `gdas` with
      `aux_skip`.
    - `select`: how the genotype is chosen from the trained supernet: `argmax` (the paper's: the
      strongest alpha; a method may set its own) or `pt` (DARTS-PT, Wang et al., 2021: by how
      much removing each op costs the supernet's validation accuracy, with fine-tuning between
      edges; see `darts_eqx.methods`).
    - `beta_reg`: beta-DARTS regularisation (Ye et al., 2022): lambda * mean over edges of
      logsumexp(alpha) added to the validation loss, lambda ramped linearly from 0 to `beta_reg`
      over the epochs (0: off; the paper uses lambda up to 50 on NAS-Bench-201, 2 on DARTS; the
      authors' NAS-Bench-201 code weighs it by 50 * epoch / 100, which `beta_reg` = 0.5 * (epochs
      - 1) reproduces).
    - `aux_skip`: DARTS-'s auxiliary skip (Chu et al., 2021): the forward pass adds beta times an
      identity to every edge, beta decaying linearly from `aux_skip` (the paper: 1) to 0 at the last
      epoch; first order only (0: off).
    - `hessian`: record the dominant eigenvalue of the Hessian of the validation loss in alpha
      after each epoch (`hessian_eigenvalue` in the history; `hessian_iterations` power steps on
      a fixed validation batch). `early_stop_factor` (DARTS-ES; e.g. 1/0.75): stop when it grew by
      more than that factor over `early_stop_window` epochs, with the genotype of the window's
      first epoch (implies `hessian`).
    - `partial_channels`: k > 1 searches PC-DARTS' partial channel connections with edge
      normalisation (Xu et al., ICLR 2020; k=4 there) in a space on the DARTS cell; it must
      divide `channels`. Its discretised network keeps the kept edges' 1/k-wide ops.
    """

    space: str = "darts"
    channels: int = 16
    layers: int = 8
    epochs: int = 50
    batch_size: int = 64
    train_portion: float = 0.5
    augment: bool = True
    w_lr: float = 0.025
    w_lr_min: float = 0.001
    w_momentum: float = 0.9
    w_weight_decay: float = 3e-4
    grad_clip: float = 5.0
    a_lr: float = 3e-4
    a_beta1: float = 0.5
    a_beta2: float = 0.999
    a_weight_decay: float = 1e-3
    order: int = 1
    estimator: str = "exact"
    xi: float | None = None
    partial_channels: int = 1
    method: str = "darts"
    select: str = "argmax"
    beta_reg: float = 0.0
    aux_skip: float = 0.0
    hessian: bool = False
    hessian_iterations: int = 20
    early_stop_factor: float | None = None
    early_stop_window: int = 5

    def __post_init__(self):
        get_space(self.space)
        positive_ints(self, "channels", "layers", "epochs", "batch_size", "hessian_iterations", "early_stop_window")
        if not 0.0 < self.train_portion < 1.0:
            raise ValueError(f"`train_portion` (={self.train_portion!r}) must lie strictly between 0 and 1")
        positive(self, "w_lr", "a_lr")
        non_negative(self, "w_lr_min", "w_weight_decay", "a_weight_decay", "grad_clip", "w_momentum", "beta_reg")
        non_negative(self, "aux_skip")
        if self.aux_skip and self.order != 1:
            raise ValueError(f"`aux_skip` (={self.aux_skip!r}) is implemented for first-order search (order=1)")
        if self.early_stop_factor is not None and not self.early_stop_factor > 1:
            raise ValueError(f"`early_stop_factor` (={self.early_stop_factor!r}) must be above 1, or None")
        self._check_partial_channels()
        if self.order not in (1, 2) or isinstance(self.order, bool):
            raise ValueError(f"`order` (={self.order!r}) must be 1 (first order) or 2 (unrolled, second order)")
        self._check_method()
        if self.estimator not in ESTIMATORS:
            raise ValueError(f"`estimator` (={self.estimator!r}) must be one of {ESTIMATORS}")
        for name in ("hessian", "augment"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"`{name}` (={getattr(self, name)!r}) must be True or False")
        if self.xi is not None and not self.xi > 0:
            raise ValueError(f"`xi` (={self.xi!r}) must be positive, or None for the current weight lr")

    def _check_method(self):
        from ._variants import METHODS

        if self.method not in METHODS:
            raise ValueError(f"`method` (={self.method!r}) must be one of {tuple(METHODS)}")
        if self.method in ("sdarts-rs", "sdarts-adv") and self.order == 2 and self.estimator == "finite_difference":
            raise ValueError(f"`method` {self.method!r} perturbs the weight step: use order 1 or the exact estimator")
        if self.method in ("gdas", "drnas", "fairdarts") and self.order == 2:
            # in second order only the weight step's forward pass sees a relaxation: alpha would
            # be trained on softmax, not on the method's op weights
            raise ValueError(f"`method` {self.method!r} is implemented for first-order search (order=1)")
        if self.method == "gdas" and self.aux_skip:
            raise ValueError("`aux_skip` adds to every op's weight; `method` 'gdas' evaluates one sampled op per edge")
        if self.method == "fairdarts" and self.early_stop_factor is not None:
            raise ValueError(
                "DARTS-ES restores alpha from the history's softmax records, which do not keep FairDARTS' sigmoids"
            )
        if self.select not in ("argmax", "pt"):
            raise ValueError(f"`select` (={self.select!r}) must be 'argmax' or 'pt'")

    def _check_partial_channels(self):
        if isinstance(self.partial_channels, bool) or not isinstance(self.partial_channels, int):
            raise ValueError(f"`partial_channels` (={self.partial_channels!r}) must be a positive integer")
        if self.partial_channels == 1:
            return
        if not get_space(self.space).topology.supports_partial_channels:
            raise ValueError(
                f"`partial_channels` (={self.partial_channels}) needs a space whose cells take partial channels "
                f"(the DARTS cell), not {self.space!r}"
            )
        if self.partial_channels < 1 or self.channels % self.partial_channels:
            raise ValueError(
                f"`partial_channels` (={self.partial_channels}) must be a positive divisor of "
                f"`channels` (={self.channels})"
            )

    @property
    def tracks_hessian(self) -> bool:
        """Whether the search records the Hessian eigenvalue (asked for, or for DARTS-ES)."""
        return self.hessian or self.early_stop_factor is not None

    def replace(self, **changes) -> "SearchConfig":
        """A copy with `changes`; unknown option names are an error naming them."""
        return replace_known(self, "search", changes)
