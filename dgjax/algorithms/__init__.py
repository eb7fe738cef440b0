"""Training methods, one module per algorithm family; each module exports :class:`dgjax.core.Method`
values and imports only the maths modules and :mod:`dgjax.core`. The registry that names them
is :mod:`dgjax.methods`.

| module | methods |
| --- | --- |
| :mod:`~dgjax.algorithms.gradient_combination` | ERM, AND-mask, SAND-mask, GroupDRO |
| :mod:`~dgjax.algorithms.invariance` | IRM, V-REx, CORAL, MMD, IGA, Fishr, SD |
| :mod:`~dgjax.algorithms.mixing` | Mixup |
| :mod:`~dgjax.algorithms.meta_learning` | Fish |
| :mod:`~dgjax.algorithms.hessian_alignment` | HGP, Hutchinson, CMA |
"""
