"""The ``polyak study`` experiments: small models on real data, raw versus averaged weights."""
