"""Measuring what we claim: sample quality, sampling speed, training cost."""
