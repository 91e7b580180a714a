"""Vertebra localiser (work in progress)."""
