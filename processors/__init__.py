"""Custom Pipecat processors, turn strategies and observers of the voice agent."""
