"""Data: label maps and SDM conditions, raw dataset folders, the demo set, the grain input pipeline
and the synthetic set (write and read).
"""
