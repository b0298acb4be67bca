"""The lightweight runtime: segmented UNet executor, controller between segments, session API."""
