"""Policy: what each saved tensor becomes, decided from what is known about it.

:mod:`~actpack.policy.rules` holds the exactness rules of piecewise activations,
:mod:`~actpack.policy.ops` the op families the decisions tell apart.
"""
