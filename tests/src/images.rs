//! Test images (PNG, JPEG) and the message dictionaries that carry them.

use std::collections::HashMap;

use zbus::Variant;

/// A test image as PNG bytes: `width` x `height` pixels from `pixel(x, y)`.
pub fn png(width: u32, height: u32, pixel: impl Fn(u32, u32) -> [u8; 3]) -> Vec<u8> {
    encode_image(width, height, pixel, image::ImageFormat::Png)
}

/// The same as a JPEG.
pub fn jpeg(width: u32, height: u32, pixel: impl Fn(u32, u32) -> [u8; 3]) -> Vec<u8> {
    encode_image(width, height, pixel, image::ImageFormat::Jpeg)
}

fn encode_image(width: u32, height: u32, pixel: impl Fn(u32, u32) -> [u8; 3], format: image::ImageFormat) -> Vec<u8> {
    let img = image::RgbImage::from_fn(width, height, |x, y| image::Rgb(pixel(x, y)));
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, format).expect("encode a test image");
    out.into_inner()
}

/// One user message with `images` before its `text`, as a `messages` value; `scope` and
/// `sealed_images` when given.
pub fn image_message(
    text: &str,
    images: &[&[u8]],
    sealed_images: &[&[u8]],
    scope: Option<&str>,
) -> HashMap<String, Variant<'static>> {
    use hearth_dbus::request_key as key;
    let list = |l: &[&[u8]]| Variant::from(l.iter().map(|b| b.to_vec()).collect::<Vec<Vec<u8>>>());
    let mut m = HashMap::from([
        (key::ROLE.to_owned(), Variant::from("user")),
        (key::CONTENT.to_owned(), Variant::from(text.to_owned())),
    ]);
    if !images.is_empty() {
        m.insert(key::IMAGES.to_owned(), list(images));
    }
    if !sealed_images.is_empty() {
        m.insert(key::SEALED_IMAGES.to_owned(), list(sealed_images));
    }
    if let Some(s) = scope {
        m.insert(key::SCOPE.to_owned(), Variant::from(s.to_owned()));
    }
    m
}
