"""The throughput and economics harness behind `hybridserve bench`."""
