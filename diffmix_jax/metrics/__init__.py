"""Scoring (NumPy, no JAX): post-processing, segmentation and classification metrics, `.mat`
records and their aggregation, and the statistics over seeds.
"""
