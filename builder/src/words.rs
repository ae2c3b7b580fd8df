//! Command lines as shell words, the way App Runner reads `run.command`: whitespace separates
//! words, single quotes keep everything, double quotes keep everything but `\"` and `\\`, a
//! backslash outside quotes escapes the next character. No variables, globs or pipes.

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WordsError {
    #[error("command {line:?} has an unclosed {quote} quote")]
    UnclosedQuote { line: String, quote: &'static str },
    #[error("command {line:?} ends with a lone backslash")]
    TrailingBackslash { line: String },
}

/// Splits a command line into words.
pub fn split_words(line: &str) -> Result<Vec<String>, WordsError> {
    let mut words = Vec::new();
    let mut word = String::new();
    let mut in_word = false;
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        match c {
            c if c.is_whitespace() => {
                if in_word {
                    words.push(std::mem::take(&mut word));
                    in_word = false;
                }
            }
            '\'' => {
                in_word = true;
                loop {
                    match chars.next() {
                        Some('\'') => break,
                        Some(c) => word.push(c),
                        None => {
                            return Err(WordsError::UnclosedQuote {
                                line: line.to_string(),
                                quote: "single",
                            });
                        }
                    }
                }
            }
            '"' => {
                in_word = true;
                loop {
                    match chars.next() {
                        Some('"') => break,
                        Some('\\') => match chars.next() {
                            Some(c @ ('"' | '\\' | '$' | '`')) => word.push(c),
                            Some(c) => {
                                word.push('\\');
                                word.push(c);
                            }
                            None => {
                                return Err(WordsError::UnclosedQuote {
                                    line: line.to_string(),
                                    quote: "double",
                                });
                            }
                        },
                        Some(c) => word.push(c),
                        None => {
                            return Err(WordsError::UnclosedQuote {
                                line: line.to_string(),
                                quote: "double",
                            });
                        }
                    }
                }
            }
            '\\' => {
                in_word = true;
                match chars.next() {
                    Some(c) => word.push(c),
                    None => {
                        return Err(WordsError::TrailingBackslash {
                            line: line.to_string(),
                        });
                    }
                }
            }
            c => {
                in_word = true;
                word.push(c);
            }
        }
    }
    if in_word {
        words.push(word);
    }
    Ok(words)
}

/// Joins words into a line [`split_words`] splits back into the same words.
pub fn join_words(words: &[String]) -> String {
    words
        .iter()
        .map(|w| {
            let plain = !w.is_empty()
                && w.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_./:=@%+,".contains(c));
            if plain {
                w.clone()
            } else {
                format!("'{}'", w.replace('\'', r"'\''"))
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_like_a_shell() {
        for (line, want) in [
            ("python app.py", vec!["python", "app.py"]),
            ("  node   server.js  ", vec!["node", "server.js"]),
            (
                r#"sh -c "echo \"hi\" there""#,
                vec!["sh", "-c", r#"echo "hi" there"#],
            ),
            ("echo 'a  b' c\\ d", vec!["echo", "a  b", "c d"]),
            ("a''b \"\"", vec!["ab", ""]),
            ("", vec![]),
        ] {
            assert_eq!(split_words(line).unwrap(), want, "{line}");
        }
        assert!(matches!(
            split_words("echo 'x"),
            Err(WordsError::UnclosedQuote {
                quote: "single",
                ..
            })
        ));
        assert!(matches!(
            split_words("echo \"x"),
            Err(WordsError::UnclosedQuote {
                quote: "double",
                ..
            })
        ));
        assert!(matches!(
            split_words("echo \\"),
            Err(WordsError::TrailingBackslash { .. })
        ));
    }

    #[test]
    fn join_splits_back() {
        for words in [
            vec!["python", "app.py"],
            vec!["sh", "-c", "echo \"it's\" $HOME"],
            vec!["", "a b", "tab\there"],
        ] {
            let words: Vec<String> = words.into_iter().map(String::from).collect();
            assert_eq!(split_words(&join_words(&words)).unwrap(), words);
        }
        assert_eq!(
            join_words(&["python".into(), "app.py".into()]),
            "python app.py"
        );
    }
}
