"""Helpers the tests share: isolated services, fleets of workers, polling."""
