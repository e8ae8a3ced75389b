"""Test support shared by the test tiers, the fuzz targets (fuzz/) and benchmarks: fakes and
drivers that only tests need, kept out of the installed kvmpy package. Importable as `support`
because tests/ is on sys.path (tests/conftest.py's directory under pytest; fuzz/ and benchmarks/
insert it themselves)."""
