"""Matrix-root optimizers as optax transformations: `jaxdecomp.optim`."""

from ._muon import (
    MuonDimensionNumbers as MuonDimensionNumbers,
    ScaleByMuonState as ScaleByMuonState,
    muon as muon,
    orthogonalize as orthogonalize,
    scale_by_muon as scale_by_muon,
)
from ._results import RESULTS as RESULTS
from ._shampoo import (
    Factors as Factors,
    QuantizedFactor as QuantizedFactor,
    QuantizedFactors as QuantizedFactors,
    ShampooState as ShampooState,
    scale_by_shampoo as scale_by_shampoo,
    shampoo as shampoo,
)
from ._soap import (
    SoapFactors as SoapFactors,
    SoapState as SoapState,
    scale_by_soap as scale_by_soap,
    soap as soap,
)
