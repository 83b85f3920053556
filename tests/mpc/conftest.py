def pytest_configure(config):
    config.addinivalue_line("markers", "he_provider: runs with the dealer-free HE provider (slower)")
