"""Example workflows that ship with Stepline."""
