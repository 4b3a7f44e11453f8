"""The web demo's page (gradio); app.py at the top starts it."""
