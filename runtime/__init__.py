"""The Langflow runtime of Site Kit: runs sellers' flows on the lfx engine and streams answers."""
