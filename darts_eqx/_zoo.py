"""Published DARTS-space genotypes, by name, each from its authors' released code."""

from ._genotype import Genotype

_C = (2, 3, 4, 5)


def _genotype(normal, normal_concat, reduce, reduce_concat) -> Genotype:
    return Genotype(tuple(normal), tuple(normal_concat), tuple(reduce), tuple(reduce_concat))


GENOTYPES: dict[str, Genotype] = {
    # DARTS, first order (Liu et al., ICLR 2019; quark0/darts cnn/genotypes.py, DARTS_V1)
    "DARTS_V1": _genotype(
        normal=[
            ("sep_conv_3x3", 1),
            ("sep_conv_3x3", 0),
            ("skip_connect", 0),
            ("sep_conv_3x3", 1),
            ("skip_connect", 0),
            ("sep_conv_3x3", 1),
            ("sep_conv_3x3", 0),
            ("skip_connect", 2),
        ],
        normal_concat=_C,
        reduce=[
            ("max_pool_3x3", 0),
            ("max_pool_3x3", 1),
            ("skip_connect", 2),
            ("max_pool_3x3", 0),
            ("max_pool_3x3", 0),
            ("skip_connect", 2),
            ("skip_connect", 2),
            ("avg_pool_3x3", 0),
        ],
        reduce_concat=_C,
    ),
    # DARTS, second order (same file, DARTS_V2; the paper's 2.76% CIFAR-10 cell)
    "DARTS_V2": _genotype(
        normal=[
            ("sep_conv_3x3", 0),
            ("sep_conv_3x3", 1),
            ("sep_conv_3x3", 0),
            ("sep_conv_3x3", 1),
            ("sep_conv_3x3", 1),
            ("skip_connect", 0),
            ("skip_connect", 0),
            ("dil_conv_3x3", 2),
        ],
        normal_concat=_C,
        reduce=[
            ("max_pool_3x3", 0),
            ("max_pool_3x3", 1),
            ("skip_connect", 2),
            ("max_pool_3x3", 1),
            ("max_pool_3x3", 0),
            ("skip_connect", 2),
            ("skip_connect", 2),
            ("max_pool_3x3", 1),
        ],
        reduce_concat=_C,
    ),
    # PC-DARTS (Xu et al., ICLR 2020; yuhuixu1993/PC-DARTS genotypes.py, PC_DARTS_cifar)
    "PC_DARTS": _genotype(
        normal=[
            ("sep_conv_3x3", 1),
            ("skip_connect", 0),
            ("sep_conv_3x3", 0),
            ("dil_conv_3x3", 1),
            ("sep_conv_5x5", 0),
            ("sep_conv_3x3", 1),
            ("avg_pool_3x3", 0),
            ("dil_conv_3x3", 1),
        ],
        normal_concat=_C,
        reduce=[
            ("sep_conv_5x5", 1),
            ("max_pool_3x3", 0),
            ("sep_conv_5x5", 1),
            ("sep_conv_5x5", 2),
            ("sep_conv_3x3", 0),
            ("sep_conv_3x3", 3),
            ("sep_conv_3x3", 1),
            ("sep_conv_3x3", 2),
        ],
        reduce_concat=_C,
    ),
    # P-DARTS (Chen et al., ICCV 2019; chenxin061/pdarts genotypes.py, PDARTS)
    "PDARTS": _genotype(
        normal=[
            ("skip_connect", 0),
            ("dil_conv_3x3", 1),
            ("skip_connect", 0),
            ("sep_conv_3x3", 1),
            ("sep_conv_3x3", 1),
            ("sep_conv_3x3", 3),
            ("sep_conv_3x3", 0),
            ("dil_conv_5x5", 4),
        ],
        normal_concat=_C,
        reduce=[
            ("avg_pool_3x3", 0),
            ("sep_conv_5x5", 1),
            ("sep_conv_3x3", 0),
            ("dil_conv_5x5", 2),
            ("max_pool_3x3", 0),
            ("dil_conv_3x3", 1),
            ("dil_conv_3x3", 1),
            ("dil_conv_5x5", 3),
        ],
        reduce_concat=_C,
    ),
    # A ResNet-like baseline in the same macro network: every node a 3x3 separable conv of the
    # previous node plus a skip of the cell input (ours, for comparison; not from a paper).
    "RESNET_LIKE": _genotype(
        normal=[
            ("sep_conv_3x3", 1),
            ("skip_connect", 1),
            ("sep_conv_3x3", 2),
            ("skip_connect", 2),
            ("sep_conv_3x3", 3),
            ("skip_connect", 3),
            ("sep_conv_3x3", 4),
            ("skip_connect", 4),
        ],
        normal_concat=(5,),
        reduce=[
            ("sep_conv_3x3", 1),
            ("skip_connect", 1),
            ("sep_conv_3x3", 2),
            ("skip_connect", 2),
            ("sep_conv_3x3", 3),
            ("skip_connect", 3),
            ("sep_conv_3x3", 4),
            ("skip_connect", 4),
        ],
        reduce_concat=(5,),
    ),
}


def named_genotype(name: str) -> Genotype:
    """A published genotype by name (case-insensitive): one of `GENOTYPES`."""
    for key, genotype in GENOTYPES.items():
        if key.lower() == name.lower():
            return genotype
    raise ValueError(f"unknown genotype name {name!r}; known: {sorted(GENOTYPES)}")
