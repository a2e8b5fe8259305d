//! The local config file (`selvedge run --config FILE`): read every 500 ms; a change is
//! parsed (on a blocking thread) and yielded as a new config, or as a refusal when it is
//! empty, unparsable, invalid or gone (the config in force stays).

use std::{path::PathBuf, sync::Arc, time::Duration};

use super::Event;
use crate::config::{self, ConfigError, LocalConfig};

#[derive(Debug)]
pub struct FileSource {
    path: PathBuf,
    /// The text last read (None: the file could not be read), applied or refused.
    last_text: Option<String>,
    interval: tokio::time::Interval,
    /// A changed text being parsed: kept across calls, so a `select!` that drops `next`
    /// mid-parse resumes the same parse instead of starting again (a loop ticking as often
    /// as the file is read could otherwise cancel it again and again).
    parsing: Option<(Option<String>, Parse)>,
}

type Parse = tokio::task::JoinHandle<Result<LocalConfig, ConfigError>>;

impl FileSource {
    /// Read and parse the file as the agent starts (an error stops the start).
    pub fn open(path: &std::path::Path) -> Result<(Self, LocalConfig), ConfigError> {
        let text =
            std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.to_owned(), source })?;
        let config = LocalConfig::parse(&text, path)?;
        let mut interval = tokio::time::interval(Duration::from_millis(config::RELOAD_INTERVAL_MS));
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        Ok((Self { path: path.to_owned(), last_text: Some(text), interval, parsing: None }, config))
    }

    /// The next change of the file. Parsed from the text just read (not the file again),
    /// so what is applied is what is remembered; on a blocking thread: a cluster-sized file
    /// takes tens of milliseconds, which the runtime's thread (the data path's) does not
    /// wait out.
    pub async fn next(&mut self) -> Event {
        loop {
            if self.parsing.is_none() {
                self.interval.tick().await;
                let text = std::fs::read_to_string(&self.path).ok();
                if text == self.last_text {
                    continue;
                }
                let parse = {
                    let (text, path) = (text.clone(), self.path.clone());
                    tokio::task::spawn_blocking(move || match &text {
                        Some(t) => LocalConfig::parse(t, &path),
                        None => LocalConfig::load(&path),
                    })
                };
                self.parsing = Some((text, parse));
            }
            let Some((_, parse)) = self.parsing.as_mut() else { continue };
            let parsed = parse.await;
            let Some((text, _)) = self.parsing.take() else { continue };
            self.last_text = text;
            return match parsed {
                Ok(Ok(cfg)) => Event::Config(Arc::new(cfg)),
                Ok(Err(e)) => Event::Refused(e.to_string()),
                Err(e) => Event::Refused(format!("the parser failed: {e}")),
            };
        }
    }
}
