"""The torch wiring: the controllers that apply :mod:`adapedit.algorithm` at each controlled
attention layer step after step, the reference's attention processors, the fused UNet (the edit
inside the UNet's forward, for export), MasaCtrl, the models, the calibration cache and the
AdapEdit pipeline with its PyTorch reference backend.
"""
