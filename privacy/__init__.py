"""Differential privacy and protected state: everything about what a run may reveal.

DP events and the per-hospital privacy ledger (``events``, ``ledger``), epsilon accounting
with Opacus' RDP and PRV accountants (``accounting``), the DP-SGD round (``dpsgd``), the
privacy-budget report (``report``), and the encrypted, signed checkpoint format with its
keyrings (``checkpoint``, ``keys``). Imports no other fedscan package.
"""
