"""An Exchange 2016 (EWS) simulator for tests, demos and benchmarks. The production path never imports it."""
