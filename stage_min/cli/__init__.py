"""What the scripts share: one-line errors, help that shows defaults, sampling options, and sample.py's job."""
