//! Preparing a request off the decode loop: checking it against the model, rendering the
//! chat template, tokenising, and compiling its grammar into a sampler. In the engine process
//! this runs on a thread of its own ("engine-prep"), in arrival order, so a long prompt or a
//! large grammar delays only its own admission, never the tokens of requests already running.

use std::sync::Arc;
use std::time::Duration;

use hearth_ffi::{Model, Sampler, Token};
use tokio::sync::{mpsc, oneshot};

use super::image::{self, ImageSpan, Vision};
use super::template::NativeTemplate;
use super::{
    Accepted, AdapterSet, Caller, CancelToken, Command, EngineError, Event, GenerateRequest, Message, Priority,
    Throttle, TokenCount, Wake,
};
use crate::structured::{ToolChoice, ToolFormat};

/// A request made ready for the worker.
#[derive(Debug)]
pub struct Prepared {
    pub prompt: Vec<Token>,
    /// Where its images' embedding rows stand in `prompt`, in order, and what decoding and
    /// encoding them took.
    pub images: Vec<ImageSpan>,
    pub image_encode: std::time::Duration,
    pub max_tokens: u32,
    pub sampler: Sampler,
    pub adapters: AdapterSet,
    /// How its tools were shown (so how its calls are written).
    pub tool_format: ToolFormat,
}

/// What an error of llama.cpp's while preparing says to the app: the input's fault where it is.
fn input_error(e: hearth_ffi::Error) -> EngineError {
    match e {
        hearth_ffi::Error::InteriorNul { what } => EngineError::InvalidArgs(format!("{what} contains a NUL character")),
        hearth_ffi::Error::Grammar => {
            EngineError::InvalidArgs("llama.cpp refused the grammar after hearthd's own checks passed it".into())
        }
        e => EngineError::Internal(e.to_string()),
    }
}

/// The rest after `took` of image encoding that keeps it within the duty cycle `duty` (the
/// share of wall time compute may take), at most 2 s (the decode loop's longest pace).
fn encode_pause(took: std::time::Duration, duty: f64) -> std::time::Duration {
    let due = took.div_f64(duty.clamp(0.01, 1.0));
    due.saturating_sub(took).min(std::time::Duration::from_secs(2))
}

/// Jobs waiting for the preparer: per app in arrival order, the apps served in turn, an
/// app's interactive jobs before the rest.
#[derive(Debug)]
struct FairQueue<T> {
    /// Apps with jobs, in the order they are served next.
    turns: std::collections::VecDeque<String>,
    jobs: std::collections::HashMap<String, std::collections::VecDeque<(bool, T)>>,
}

impl<T> Default for FairQueue<T> {
    fn default() -> Self {
        Self { turns: Default::default(), jobs: Default::default() }
    }
}

impl<T> FairQueue<T> {
    fn push(&mut self, app: String, interactive: bool, job: T) {
        let jobs = self.jobs.entry(app.clone()).or_default();
        if jobs.is_empty() {
            self.turns.push_back(app);
        }
        jobs.push_back((interactive, job));
    }

    /// The next job: the first interactive one of the app whose turn comes first, else the
    /// next app's oldest.
    fn pop(&mut self) -> Option<T> {
        let k =
            self.turns.iter().position(|a| self.jobs.get(a).is_some_and(|j| j.iter().any(|(i, _)| *i))).unwrap_or(0);
        let app = self.turns.remove(k)?;
        let jobs = self.jobs.get_mut(&app)?;
        let j = jobs.iter().position(|(i, _)| *i).unwrap_or(0);
        let (_, job) = jobs.remove(j)?;
        if jobs.is_empty() {
            self.jobs.remove(&app);
        } else {
            self.turns.push_back(app);
        }
        Some(job)
    }
}

/// A request rendered and tokenized: its prompt, its images' places in it and their encoding
/// time, its grammar and how its tools were shown.
struct Rendered {
    prompt: Vec<Token>,
    images: Vec<ImageSpan>,
    image_encode: Duration,
    grammar: Option<Arc<str>>,
    tool_format: ToolFormat,
}

/// A conversation as prompt text: whether the tokenizer adds the model's special tokens, the
/// grammar, and how the tools were shown.
struct Shown {
    text: String,
    add_special: bool,
    grammar: Option<Arc<str>>,
    tool_format: ToolFormat,
}

/// What preparing needs of the loaded model.
#[derive(Debug, Clone)]
pub struct Preparer {
    model: Arc<Model>,
    model_name: String,
    /// Tokens one request's context holds.
    n_ctx: u32,
    throttle: Arc<Throttle>,
    /// The model's vision projector, if it has one.
    vision: Option<Vision>,
    /// The model's own template, where it shows tools.
    native: Option<Arc<NativeTemplate>>,
    /// Compute time per app (image encoding here), for the energy ledger.
    compute: Arc<super::Compute>,
}

/// A Submit on its way to the worker, or a CountTokens.
#[derive(Debug)]
pub struct Job {
    pub request: Box<GenerateRequest>,
    pub caller: Caller,
    pub cancel: CancelToken,
    pub work: Work,
}

/// What a job is for.
#[derive(Debug)]
pub enum Work {
    /// A generation: its events, and the verdict.
    Submit { events: mpsc::UnboundedSender<Event>, reply: oneshot::Sender<Result<Accepted, EngineError>> },
    /// Only the count of its prompt's tokens.
    Count(oneshot::Sender<Result<TokenCount, EngineError>>),
}

impl Preparer {
    pub fn new(
        model: Arc<Model>,
        model_name: String,
        n_ctx: u32,
        throttle: Arc<Throttle>,
        vision: Option<Vision>,
        native: Option<Arc<NativeTemplate>>,
        compute: Arc<super::Compute>,
    ) -> Self {
        Self { model, model_name, n_ctx, throttle, vision, native, compute }
    }

    /// Checks `request` of `app` against the model and the memory ceiling, and renders,
    /// tokenises and compiles it.
    pub fn prepare(&self, app: &str, request: &GenerateRequest) -> Result<Prepared, EngineError> {
        if let Some(refusal) = self.throttle.ceiling_refusal() {
            return Err(refusal);
        }
        if request.max_tokens > self.n_ctx {
            return Err(EngineError::InvalidArgs(format!(
                "max_tokens {} exceeds the context length {} of model {:?}",
                request.max_tokens, self.n_ctx, self.model_name
            )));
        }
        let Rendered { prompt, images, image_encode, grammar, tool_format } = self.render(app, request)?;
        // Room for the prompt and at least one generated token.
        if prompt.len() >= self.n_ctx as usize {
            return Err(EngineError::ContextLengthExceeded { prompt: prompt.len(), context: self.n_ctx });
        }
        let adapters = self.adapter_set(request.adapters.as_ref())?;
        let max_tokens = request.max_tokens.min(self.n_ctx - prompt.len() as u32);
        let sampler = Sampler::with_grammar(&self.model, request.sampling, grammar.as_deref()).map_err(input_error)?;
        Ok(Prepared { prompt, images, image_encode, max_tokens, sampler, adapters, tool_format })
    }

    /// What `request` of `app` takes of the context, rendered and tokenized as [`Self::prepare`]
    /// does (an error where it would fail to render).
    pub fn count(&self, app: &str, request: &GenerateRequest) -> Result<TokenCount, EngineError> {
        if let Some(refusal) = self.throttle.ceiling_refusal().filter(|_| !request.images.is_empty()) {
            // Encoding images allocates; counting text does not.
            return Err(refusal);
        }
        let r = self.render(app, request)?;
        let image_tokens = r.images.iter().map(|i| i.n_tokens as u32).sum();
        Ok(TokenCount { prompt_tokens: r.prompt.len() as u32, image_tokens, context_length: self.n_ctx })
    }

    /// Renders the conversation (tools shown in the model's format) and tokenizes it, each
    /// image's tokens in place of its marker at the start of its message's text.
    fn render(&self, app: &str, request: &GenerateRequest) -> Result<Rendered, EngineError> {
        let mut messages = request.messages.clone();
        if !request.images.is_empty() {
            self.place_markers(request, &mut messages)?;
        }
        let Shown { mut text, add_special, grammar, tool_format } = self.template(request, &messages)?;
        if let Some(prefix) = &request.assistant_prefix {
            text.push_str(prefix);
        }
        if request.images.is_empty() {
            let prompt = self.model.tokenize(&text, add_special, true)?;
            return Ok(Rendered { prompt, images: Vec::new(), image_encode: Duration::ZERO, grammar, tool_format });
        }
        let (prompt, images, image_encode) = self.with_images(app, request, &text, add_special)?;
        self.compute.add(app, image_encode.as_micros() as u64, request.priority == Priority::Background);
        // Encoding images is compute like a decode step: under the thermal governor's duty
        // cycle, the preparer rests after it as the decode loop does after a step.
        if let Some(pause) = self.throttle.duty().map(|d| encode_pause(image_encode, d)).filter(|p| !p.is_zero()) {
            tracing::debug!(
                encode_ms = image_encode.as_millis() as u64,
                pause_ms = pause.as_millis() as u64,
                "image encode paced"
            );
            std::thread::sleep(pause);
        }
        Ok(Rendered { prompt, images, image_encode, grammar, tool_format })
    }

    /// The prompt text of `messages`, whether the tokenizer adds the model's special tokens
    /// (not when the text begins with BOS itself), the grammar, and how tools were shown:
    /// by the model's own template where it shows them (and the choice lets the model call),
    /// else the constrained way through llama.h's template API.
    fn template(&self, request: &GenerateRequest, messages: &[Message]) -> Result<Shown, EngineError> {
        let tools = request.tools.as_deref();
        if let (Some(tools), Some(native)) = (tools, &self.native)
            && tools.choice != ToolChoice::None
        {
            let list: serde_json::Value = serde_json::from_str(&tools.tools)
                .map_err(|e| EngineError::Internal(format!("the request's tools are not JSON: {e}")))?;
            let text = native.render(messages, &list).map_err(EngineError::InvalidArgs)?;
            return Ok(Shown {
                add_special: !native.starts_with_bos(&text),
                text,
                grammar: tools.grammar(native.format()).map(Arc::from),
                tool_format: native.format(),
            });
        }
        let mut plain: Vec<hearth_ffi::ChatMessage> = messages.iter().map(Message::plain).collect();
        let grammar = match tools {
            Some(tools) => {
                match plain.first_mut() {
                    Some(first) if first.role == "system" => {
                        first.content = tools.constrained_system(Some(&first.content));
                    }
                    _ => plain.insert(
                        0,
                        hearth_ffi::ChatMessage { role: "system".into(), content: tools.constrained_system(None) },
                    ),
                }
                tools.grammar(ToolFormat::Constrained).map(Arc::from)
            }
            None => request.grammar.clone(),
        };
        let text = self.model.apply_chat_template(&plain, true).map_err(input_error)?;
        Ok(Shown { text, add_special: true, grammar, tool_format: ToolFormat::Constrained })
    }

    /// Puts each image's marker at the start of its message's text (checking that no text
    /// holds one already).
    fn place_markers(&self, request: &GenerateRequest, messages: &mut [Message]) -> Result<(), EngineError> {
        if self.vision.is_none() {
            return Err(EngineError::InvalidArgs(format!(
                "model {:?} takes no images: its manifest names no vision projector (mmproj)",
                self.model_name
            )));
        }
        let calls = request.messages.iter().flat_map(|m| &m.tool_calls).map(|c| c.arguments.as_str());
        let mut texts = request.messages.iter().map(|m| m.content.as_str()).chain(calls);
        if texts.any(|t| t.contains(image::MARKER))
            || request.assistant_prefix.as_deref().is_some_and(|p| p.contains(image::MARKER))
        {
            return Err(EngineError::InvalidArgs(format!(
                "a message holds the text {:?}, which marks images here",
                image::MARKER
            )));
        }
        if request.images.iter().any(|im| im.message as usize >= messages.len()) {
            return Err(EngineError::Internal("an image belongs to no message".into()));
        }
        for (i, m) in messages.iter_mut().enumerate() {
            let n = request.images.iter().filter(|im| im.message as usize == i).count();
            if n > 0 {
                let sep = if m.content.is_empty() { "" } else { "\n" };
                m.content = format!("{}{sep}{}", image::MARKER.repeat(n), m.content);
            }
        }
        Ok(())
    }

    /// Tokenizes rendered `text` around its image markers, each image encoded in their place
    /// (image.rs).
    fn with_images(
        &self,
        app: &str,
        request: &GenerateRequest,
        text: &str,
        add_special: bool,
    ) -> Result<(Vec<Token>, Vec<ImageSpan>, Duration), EngineError> {
        let Some(vision) = &self.vision else {
            return Err(EngineError::Internal("images without a projector".into()));
        };
        let pieces: Vec<&str> = text.split(image::MARKER).collect();
        if pieces.len() != request.images.len() + 1 {
            return Err(EngineError::InvalidArgs(format!(
                "the chat template of model {:?} did not place every image ({} of {})",
                self.model_name,
                pieces.len() - 1,
                request.images.len()
            )));
        }
        // Images in message order (the messages' own order of images kept).
        let mut order: Vec<(usize, &super::ImageInput)> = request.images.iter().enumerate().collect();
        order.sort_by_key(|(k, im)| (im.message, *k));
        let (mut prompt, mut spans, mut took) = (Vec::new(), Vec::new(), Duration::ZERO);
        for (k, piece) in pieces.iter().enumerate() {
            prompt.extend(self.model.tokenize(piece, k == 0 && add_special, true)?);
            if let Some((n, im)) = order.get(k) {
                let what = format!("image {n} (of messages[{}])", im.message);
                took += vision.append(app, &what, &im.bytes, &mut prompt, &mut spans)?;
                if prompt.len() >= self.n_ctx as usize {
                    return Err(EngineError::ContextLengthExceeded { prompt: prompt.len(), context: self.n_ctx });
                }
            }
        }
        if prompt.last().is_some_and(|t| image::is_placeholder(*t)) {
            return Err(EngineError::InvalidArgs(
                "the prompt ends with an image: the model needs text after it".into(),
            ));
        }
        Ok((prompt, spans, took))
    }

    /// The adapter scales a request asks for: exactly the named adapters, or without names the
    /// manifest's scales.
    fn adapter_set(&self, wanted: Option<&std::collections::BTreeMap<String, f32>>) -> Result<AdapterSet, EngineError> {
        let Some(wanted) = wanted else { return Ok(AdapterSet::new(&self.model.lora_default_scales())) };
        let names: Vec<&str> = self.model.lora_names().collect();
        if let Some(unknown) = wanted.keys().find(|k| !names.contains(&k.as_str())) {
            return Err(EngineError::InvalidArgs(format!(
                "model {:?} has no adapter {unknown:?} (its adapters: {names:?})",
                self.model_name
            )));
        }
        let scales: Vec<f32> = names.iter().map(|n| wanted.get(*n).copied().unwrap_or(0.0)).collect();
        Ok(AdapterSet::new(&scales))
    }

    /// Prepares jobs until `jobs` closes, each app's in arrival order, the apps' in turn
    /// (interactive jobs first), so one app's stream of costly jobs (images) delays another
    /// app's by at most one job each: a refusal is answered here, a prepared request goes to
    /// the worker (`cmd`); either way the worker is woken (it may be waiting for preparation
    /// to end, [`Wake::wait_for_preparation`]); an interactive one asks a running
    /// lower-priority step to yield (`preempt`).
    pub fn run(
        self,
        mut jobs: mpsc::UnboundedReceiver<Job>,
        cmd: &mpsc::Sender<Command>,
        wake: &Wake,
        preempt: &hearth_ffi::AbortSwitch,
    ) {
        /// Counts the job out when it is done with, however that happens (a panic too).
        struct Done<'a>(&'a Wake);
        impl Drop for Done<'_> {
            fn drop(&mut self) {
                self.0.prepared();
            }
        }
        let mut queue = FairQueue::default();
        loop {
            while let Ok(job) = jobs.try_recv() {
                queue.push(job.caller.app.clone(), job.request.priority == Priority::Interactive, job);
            }
            let job = match queue.pop() {
                Some(job) => job,
                None => match jobs.blocking_recv() {
                    Some(job) => job,
                    None => return,
                },
            };
            let done = Done(wake);
            let Job { request, caller, cancel, work } = job;
            let (events, reply) = match work {
                Work::Count(reply) => {
                    if !reply.is_closed() {
                        let _ = reply.send(self.count(&caller.app, &request));
                    }
                    continue;
                }
                Work::Submit { events, reply } => (events, reply),
            };
            // Work nobody waits for any more (cancelled, caller gone) is not prepared: images
            // are costly to encode.
            let gone = cancel.reason().or_else(|| events.is_closed().then_some(super::CancelReason::Disconnected));
            if let Some(reason) = gone {
                let _ = reply.send(Err(EngineError::Cancelled(reason)));
                continue;
            }
            let prepared = match self.prepare(&caller.app, &request) {
                Ok(p) => p,
                Err(e) => {
                    let _ = reply.send(Err(e));
                    continue;
                }
            };
            let interactive = request.priority == Priority::Interactive;
            let submit = Command::Submit { request, prepared: Box::new(prepared), caller, cancel, events, reply };
            let sent = cmd.blocking_send(submit);
            // Counted out after the send, so a worker that sees none left finds it queued.
            drop(done);
            if sent.is_err() {
                return;
            }
            if interactive {
                // After the send, so the aborted step's next intake finds the request.
                preempt.request();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    #[test]
    fn image_encodes_rest_to_keep_the_duty_cycle() {
        let ms = Duration::from_millis;
        assert_eq!(super::encode_pause(ms(100), 0.25), ms(300), "100 ms of compute in 400 ms");
        assert_eq!(super::encode_pause(ms(100), 1.0), Duration::ZERO);
        assert_eq!(super::encode_pause(ms(900), 0.1), Duration::from_secs(2), "never more than 2 s");
        assert_eq!(super::encode_pause(Duration::ZERO, 0.1), Duration::ZERO, "a cached image costs nothing");
    }

    #[test]
    fn apps_take_turns_and_interactive_jobs_go_first() {
        let mut q = super::FairQueue::default();
        for k in 0..4 {
            q.push("flood".into(), false, format!("flood{k}"));
        }
        q.push("b".into(), false, "b0".to_owned());
        q.push("c".into(), false, "c0".to_owned());
        q.push("b".into(), true, "b1!".to_owned());
        let order: Vec<String> = std::iter::from_fn(|| q.pop()).collect();
        assert_eq!(order, ["b1!", "flood0", "c0", "b0", "flood1", "flood2", "flood3"]);
    }
}
