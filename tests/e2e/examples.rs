//! Every example in workflows/ compiles; those that need no outside service run.
