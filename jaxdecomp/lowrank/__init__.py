"""Low-rank layers and adapters: `jaxdecomp.lowrank`."""

from ._compress import compress as compress, compression_report as compression_report
from ._diagnostics import ranks as ranks, spectra as spectra
from ._dlrt import DLRTState as DLRTState, dlrt as dlrt
from ._layers import (
    FactorizedLinear as FactorizedLinear,
    LowRankLinear as LowRankLinear,
)
from ._lora import (
    LoRA as LoRA,
    lora as lora,
    merge as merge,
    trainable as trainable,
    unmerge as unmerge,
)
from ._trp import TRPState as TRPState, trp as trp
from ._tucker import TuckerConv2d as TuckerConv2d
