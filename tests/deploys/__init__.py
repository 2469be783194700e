"""Workflow modules as a deploy would bring them: `stepline replay-check --workflows tests.deploys.X`."""
