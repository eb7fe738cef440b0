"""Training methods, one module per algorithm family; each module exports :class:`dgjax.core.Method`
values and imports only the maths modules and :mod:`dgjax.core`. The registry that names them
is :mod:`dgjax.methods`.

| module | methods |
| --- | --- |
| :mod:`~dgjax.algorithms.gradient_combination` | ERM, AND-mask, SAND-mask, GroupDRO |
| :mod:`~dgjax.algorithms.invariance` | IRM, V-REx, CORAL, MMD, IGA, Fishr, SD |
| :mod:`~dgjax.algorithms.representation` | IB-ERM, IB-IRM, RSC, SelfReg |
| :mod:`~dgjax.algorithms.risk_shaping` | EQRM, RDM, TRM |
| :mod:`~dgjax.algorithms.causal` | CausIRL-CORAL, CausIRL-MMD |
| :mod:`~dgjax.algorithms.contrastive` | CAD, CondCAD |
| :mod:`~dgjax.algorithms.erm_variants` | ERM++, URM |
| :mod:`~dgjax.algorithms.adrmx` | ADRMX |
| :mod:`~dgjax.algorithms.adversarial` | DANN, CDANN, Transfer |
| :mod:`~dgjax.algorithms.meta_gradient` | MLDG |
| :mod:`~dgjax.algorithms.meta_learning` | Fish |
| :mod:`~dgjax.algorithms.feature_mixing` | MTL, SagNet |
| :mod:`~dgjax.algorithms.adaptation` | ARM |
| :mod:`~dgjax.algorithms.mixing` | Mixup |
| :mod:`~dgjax.algorithms.hessian_alignment` | HGP, Hutchinson, CMA |
"""
