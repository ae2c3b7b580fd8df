//! Helpers shared by lull's end-to-end and privileged tests.
