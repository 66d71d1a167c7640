//! How every role reads its TOML file (`proxy.toml`, `auth.toml`, `exporter.toml`): the text
//! parsed once into a table (a syntax error names its line), every section deserialised on its
//! own so one bad section does not hide another's errors, each error under its key path
//! (`limits.max_headers: …`), unknown sections named, and all of them returned at once as
//! `FILE: key: message` lines. The roles' own semantic checks push into the same list.

use std::path::Path;

use serde::de::DeserializeOwned;

/// Everything wrong with one config file, one `FILE: key.path: message` line per problem.
#[derive(Debug, thiserror::Error)]
#[error("{}", .errors.join("\n"))]
pub struct ConfigError {
    /// The lines.
    pub errors: Vec<String>,
}

/// The text of the file at `path`.
pub fn read(path: &Path) -> Result<String, ConfigError> {
    std::fs::read_to_string(path).map_err(|e| ConfigError {
        errors: vec![format!("{}: cannot read: {e}", path.display())],
    })
}

/// `text` as a TOML table; a syntax error is `origin:LINE: message`.
pub fn table(text: &str, origin: &str) -> Result<toml::Table, ConfigError> {
    text.parse().map_err(|e: toml::de::Error| {
        let line = e.span().map_or(0, |s| {
            text[..s.start.min(text.len())].matches('\n').count() + 1
        });
        ConfigError {
            errors: vec![format!("{origin}:{line}: {}", e.message())],
        }
    })
}

/// Records every top-level key of `table` that is not one of `known`.
pub fn unknown_sections(table: &toml::Table, known: &[&str], errors: &mut Vec<String>) {
    for key in table.keys() {
        if !known.contains(&key.as_str()) {
            errors.push(format!(
                "{key}: unknown section, expected one of {}",
                known.join(", ")
            ));
        }
    }
}

/// Deserialises `value`, recording a failure under `key` (plus the path inside it).
pub fn value<T: DeserializeOwned>(
    key: &str,
    value: &toml::Value,
    errors: &mut Vec<String>,
) -> Option<T> {
    match serde_path_to_error::deserialize::<_, T>(value.clone()) {
        Ok(v) => Some(v),
        Err(e) => {
            let path = e.path().to_string();
            let key = if path == "." {
                key.to_owned()
            } else {
                format!("{key}.{path}")
            };
            errors.push(format!("{key}: {}", e.into_inner().message()));
            None
        }
    }
}

/// `table[name]` deserialised, or the default when it is absent or wrong (the error recorded).
pub fn section<T: DeserializeOwned + Default>(
    table: &toml::Table,
    name: &str,
    errors: &mut Vec<String>,
) -> T {
    table
        .get(name)
        .and_then(|v| value(name, v, errors))
        .unwrap_or_default()
}

/// `config` when nothing was recorded, else every error prefixed with `origin`.
pub fn finish<C>(config: C, origin: &str, errors: Vec<String>) -> Result<C, ConfigError> {
    if errors.is_empty() {
        Ok(config)
    } else {
        Err(ConfigError {
            errors: errors
                .into_iter()
                .map(|e| format!("{origin}: {e}"))
                .collect(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Default, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Limits {
        #[serde(default)]
        max: u32,
    }

    #[test]
    fn every_error_comes_at_once_with_file_and_key() {
        let t = table("[limits]\nmax = \"x\"\n[other]\n", "f.toml").unwrap();
        let mut errors = Vec::new();
        unknown_sections(&t, &["limits"], &mut errors);
        let limits: Limits = section(&t, "limits", &mut errors);
        assert_eq!(limits.max, 0, "a wrong section falls back to its default");
        let e = finish((), "f.toml", errors).unwrap_err();
        assert_eq!(e.errors.len(), 2, "{e}");
        assert!(e.errors[0].starts_with("f.toml: other: unknown section, expected one of limits"));
        assert!(
            e.errors[1].starts_with("f.toml: limits.max: invalid type"),
            "{e}"
        );
    }

    #[test]
    fn syntax_errors_name_the_line() {
        let e = table("a = 1\nb = = 2\n", "f.toml").unwrap_err();
        assert!(e.errors[0].starts_with("f.toml:2: "), "{e}");
    }
}
