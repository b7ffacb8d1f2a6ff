def pytest_configure(config):
    config.addinivalue_line("markers", "slow: takes more than a few seconds (compiles); CI runs it: pytest -m 'not slow' skips it")
