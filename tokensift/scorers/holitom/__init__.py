from tokensift.scorers.holitom.model import HoliTomConfig, HoliTomMethod, holitom_keep_ratios

__all__ = ["HoliTomConfig", "HoliTomMethod", "holitom_keep_ratios"]
