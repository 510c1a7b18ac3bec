"""Other client protocols in the words of chat completions, and back."""
