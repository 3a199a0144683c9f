"""The network: BitLinear (what b1.58 means in code), the transformer in the 2B4T layout,
and the inference engines that swap its layers (int8, compiled decoding). Knows nothing of
runs, tasks or training loops; imports config/ and data/ (the cache folder) only."""
