//! What tokens cost: a price table per model (USD per million tokens of each kind) and each
//! model's context window. Used when a backend does not report its own cost (the Messages API
//! and OpenAI-compatible servers report tokens only; the Claude Code CLI reports
//! `total_cost_usd`, which wins).
//!
//! The shipped defaults are Anthropic's list prices; the worker's config file adds or replaces
//! entries (`[prices."model-name"]`). A model is priced by its exact name, else by the longest
//! table key it starts with, so `claude-sonnet-4-5-20250929` is priced as `claude-sonnet-4-5`.

use orch_shared::job::Usage;
use serde::Deserialize;

/// The context window assumed for a Claude model that has no entry of its own.
pub const CLAUDE_CONTEXT_WINDOW: u64 = 200_000;

/// USD per million tokens of each kind, and the model's context window.
#[derive(Clone, Copy, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Price {
    pub input: f64,
    pub output: f64,
    /// Writing the prompt cache; 1.25 × `input` (the 5-minute cache) when not given.
    #[serde(default)]
    pub cache_write: Option<f64>,
    /// Reading the prompt cache; 0.1 × `input` when not given.
    #[serde(default)]
    pub cache_read: Option<f64>,
    /// Tokens the model can hold in one request.
    #[serde(default)]
    pub context_window: Option<u64>,
}

impl Price {
    const fn claude(input: f64, output: f64) -> Price {
        Price {
            input,
            output,
            cache_write: None,
            cache_read: None,
            context_window: Some(CLAUDE_CONTEXT_WINDOW),
        }
    }

    /// The cost of `usage` in US dollars, unrounded.
    pub fn cost(&self, usage: &Usage) -> f64 {
        let cache_write = self.cache_write.unwrap_or(self.input * 1.25);
        let cache_read = self.cache_read.unwrap_or(self.input * 0.1);
        (usage.input_tokens as f64 * self.input
            + usage.output_tokens as f64 * self.output
            + usage.cache_creation_tokens as f64 * cache_write
            + usage.cache_read_tokens as f64 * cache_read)
            / 1_000_000.0
    }

    fn check(&self, model: &str) -> Result<(), String> {
        let all = [
            Some(self.input),
            Some(self.output),
            self.cache_write,
            self.cache_read,
        ];
        if all.into_iter().flatten().any(|p| !p.is_finite() || p < 0.0) {
            return Err(format!(
                "prices.{model}: prices must be non-negative numbers (USD per million tokens)"
            ));
        }
        if self.context_window == Some(0) {
            return Err(format!("prices.{model}.context_window: must be positive"));
        }
        Ok(())
    }
}

/// Anthropic list prices (USD per million tokens), newest models first. The CLI's aliases
/// (`opus`, `sonnet`, `haiku`) are priced as the newest model of the family.
const DEFAULTS: &[(&str, Price)] = &[
    ("claude-opus-4-5", Price::claude(5.0, 25.0)),
    ("claude-opus-4-1", Price::claude(15.0, 75.0)),
    ("claude-opus-4", Price::claude(15.0, 75.0)),
    ("claude-sonnet-4-5", Price::claude(3.0, 15.0)),
    ("claude-sonnet-4", Price::claude(3.0, 15.0)),
    ("claude-3-7-sonnet", Price::claude(3.0, 15.0)),
    ("claude-3-5-sonnet", Price::claude(3.0, 15.0)),
    ("claude-haiku-4-5", Price::claude(1.0, 5.0)),
    ("claude-3-5-haiku", Price::claude(0.8, 4.0)),
    ("claude-3-haiku", Price::claude(0.25, 1.25)),
    ("opus", Price::claude(5.0, 25.0)),
    ("sonnet", Price::claude(3.0, 15.0)),
    ("haiku", Price::claude(1.0, 5.0)),
];

/// Prices by model name.
#[derive(Clone, Debug, PartialEq)]
pub struct PriceTable {
    entries: Vec<(String, Price)>,
}

impl Default for PriceTable {
    fn default() -> Self {
        Self {
            entries: DEFAULTS
                .iter()
                .map(|(name, price)| (name.to_string(), *price))
                .collect(),
        }
    }
}

impl PriceTable {
    /// The defaults with `overrides` added (an override of a default model replaces it).
    pub fn with_overrides<'a>(
        overrides: impl IntoIterator<Item = (&'a String, &'a Price)>,
    ) -> Result<Self, String> {
        let mut table = Self::default();
        for (model, price) in overrides {
            if model.trim().is_empty() {
                return Err("prices: a model name is empty".into());
            }
            price.check(model)?;
            table.entries.retain(|(name, _)| name != model);
            table.entries.push((model.clone(), *price));
        }
        Ok(table)
    }

    /// The price of `model`: its own entry, else the longest key it starts with (ignoring a
    /// provider prefix such as `anthropic/`).
    pub fn lookup(&self, model: &str) -> Option<&Price> {
        let bare = model.rsplit('/').next().unwrap_or(model);
        if let Some((_, p)) = self.entries.iter().find(|(k, _)| k == model || k == bare) {
            return Some(p);
        }
        self.entries
            .iter()
            .filter(|(k, _)| {
                bare.starts_with(k.as_str()) && bare[k.len()..].starts_with(['-', '@'])
            })
            .max_by_key(|(k, _)| k.len())
            .map(|(_, p)| p)
    }

    /// The cost of `usage` on `model`; `None` when the model has no price.
    pub fn cost(&self, model: Option<&str>, usage: &Usage) -> Option<f64> {
        model.and_then(|m| self.lookup(m)).map(|p| p.cost(usage))
    }

    /// The context window of `model`, when known.
    pub fn context_window(&self, model: &str) -> Option<u64> {
        self.lookup(model).and_then(|p| p.context_window)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn usage(i: u64, o: u64, cw: u64, cr: u64) -> Usage {
        Usage {
            input_tokens: i,
            output_tokens: o,
            cache_creation_tokens: cw,
            cache_read_tokens: cr,
        }
    }

    #[test]
    fn dated_model_names_get_their_family_price() {
        let t = PriceTable::default();
        let sonnet = t.lookup("claude-sonnet-4-5-20250929").unwrap();
        assert_eq!(sonnet.input, 3.0);
        // The longest key wins: opus 4.5 is not priced as opus 4.
        assert_eq!(t.lookup("claude-opus-4-5-20251101").unwrap().input, 5.0);
        assert_eq!(t.lookup("claude-opus-4-20250514").unwrap().input, 15.0);
        assert_eq!(t.lookup("anthropic/claude-haiku-4-5").unwrap().input, 1.0);
        assert!(t.lookup("llama3.1:8b").is_none());
        // A key must end at a word boundary of the name.
        assert!(t.lookup("claude-sonnet-45").is_none());
    }

    #[test]
    fn cost_uses_every_kind_and_is_not_rounded() {
        let t = PriceTable::default();
        // The Claude Code CLI reports 0.002775 for exactly this usage on claude-sonnet-4-5.
        let c = t
            .cost(Some("claude-sonnet-4-5"), &usage(200, 100, 20, 2000))
            .unwrap();
        assert!((c - 0.002775).abs() < 1e-12, "{c}");
        let tiny = t.cost(Some("claude-3-haiku"), &usage(1, 0, 0, 0)).unwrap();
        assert!(tiny > 0.0 && tiny < 1e-6);
    }

    #[test]
    fn overrides_replace_and_add_and_are_checked() {
        let mut o = std::collections::BTreeMap::new();
        o.insert(
            "claude-sonnet-4-5".to_string(),
            Price {
                input: 1.0,
                output: 2.0,
                cache_write: Some(0.0),
                cache_read: Some(0.0),
                context_window: Some(1_000_000),
            },
        );
        o.insert(
            "qwen2.5-coder".to_string(),
            Price {
                input: 0.1,
                output: 0.2,
                cache_write: None,
                cache_read: None,
                context_window: Some(32_768),
            },
        );
        let t = PriceTable::with_overrides(&o).unwrap();
        assert_eq!(t.lookup("claude-sonnet-4-5").unwrap().input, 1.0);
        assert_eq!(t.context_window("claude-sonnet-4-5"), Some(1_000_000));
        assert_eq!(t.context_window("qwen2.5-coder-7b"), Some(32_768));
        o.get_mut("qwen2.5-coder").unwrap().input = -1.0;
        assert!(
            PriceTable::with_overrides(&o)
                .unwrap_err()
                .starts_with("prices.qwen2.5-coder")
        );
    }
}
