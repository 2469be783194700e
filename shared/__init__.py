"""Code every Stepline process shares: settings, messages, storage, broker, telemetry, errors."""
